//! Assembling and running the gateway: the HTTP routes, start-up (encoders, usage pipeline),
//! readiness, and graceful shutdown — stop accepting, let in-flight requests and streams finish
//! within the grace period, then flush the usage sink.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::admin;
use crate::api::{new_request_id_bytes, ClientChoseRequestId, Endpoint, X_REQUEST_ID};
use crate::app::{App, Services};
use crate::auth::group::{group_change, members_spend, GroupRecord};
use crate::auth::store::{KeyStore, SqliteKeyStore, StoreError};
use crate::config::Config;
use crate::config::{StateBackend, StoreBackend};
use crate::error::GatewayError;
use crate::lanes::{ConnectionGate, Lanes, Serving};
use crate::limits::{BudgetPeriod, Level, Limiter, SystemClock};
use crate::meter::sink::Durability;
use crate::meter::sink::UsagePipeline;
use crate::meter::sink::UsageWriter;
use crate::meter::tokenizer::Tokenizer;
use crate::metrics::Metrics;
use crate::money::Money;
use crate::proxy;
use crate::rating::ledger::{LedgerReader, LedgerWriter, SqliteLedgerReader};
use crate::rating::Rater;
use crate::state::redis::RedisState;
use crate::state::{Admission, RatingTotals};
use crate::store::PgStore;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot build the tokenizers: {0}")]
    Tokenizer(String),
    #[error("cannot open the usage sink under {dir}: {source}")]
    Sink { dir: String, source: std::io::Error },
    #[error("cannot open the store: {0}")]
    Store(String),
    #[error("cannot reach the shared state: {0}")]
    State(String),
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
    /// loaded here so `/readyz` only says ready once counting is possible, and the backends of
    /// shared state and storage are chosen here, once.
    pub async fn start(config: Config, admin_token: Option<String>) -> Result<Gateway, StartError> {
        let tokenizer = Tokenizer::new().map_err(|e| StartError::Tokenizer(e.to_string()))?;
        let metrics = Arc::new(Metrics::new());
        // PostgreSQL's client blocks (and runs its own runtime): it connects on the blocking pool.
        let store = {
            let backend = config.store.clone();
            let data_dir = config.server.data_dir.clone();
            let durability = config.durability;
            let retention = config.raw_retention_days;
            tokio::task::spawn_blocking(move || {
                open_store(&backend, &data_dir, durability, retention)
            })
            .await
            .map_err(|e| StartError::Store(e.to_string()))??
        };
        let pipeline = UsagePipeline::start(
            store.writer,
            config.server.usage_channel_capacity,
            metrics.clone(),
        )
        .map_err(|source| StartError::Sink {
            dir: config.server.data_dir.display().to_string(),
            source,
        })?;
        let key_store = store.keys;
        let ledger = store.ledger;
        let listed = key_store.clone();
        let (keys, groups) = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((listed.list()?, listed.list_groups()?))
        })
        .await
        .map_err(|e| StartError::Store(e.to_string()))?
        .map_err(|e| StartError::Store(e.to_string()))?;
        let local = Limiter::new(
            Arc::new(SystemClock),
            config.budget_alerts.thresholds_pct.clone(),
        );
        let (admission, totals, shared) = match &config.state {
            StateBackend::Embedded => (
                Admission::Embedded(local),
                RatingTotals::Embedded(Rater::default()),
                None,
            ),
            StateBackend::Redis {
                url,
                on_unavailable,
                lease,
                replicas,
            } => {
                if config.store == StoreBackend::Sqlite {
                    tracing::warn!(
                        "shared state on Redis with keys and ledger in SQLite: each replica has \
                         its own keys and ledger; use `[store] backend = \"postgres\"`"
                    );
                }
                let redis = RedisState::connect(
                    url,
                    *lease,
                    *on_unavailable,
                    *replicas,
                    config.budget_alerts.thresholds_pct.clone(),
                    metrics.state_backend_up.clone(),
                    metrics.state_admissions.clone(),
                )
                .await
                .map_err(|e| StartError::State(e.to_string()))?;
                (
                    Admission::Shared {
                        redis: redis.clone(),
                        local_share: local,
                        share: 1.0 / f64::from(*replicas),
                        ledger: ledger.clone(),
                        keys: key_store.clone(),
                    },
                    RatingTotals::Shared {
                        redis: redis.clone(),
                        ledger: ledger.clone(),
                    },
                    Some(redis),
                )
            }
        };
        let app = Arc::new(App::new(
            config,
            Services {
                tokenizer,
                metrics,
                usage: pipeline.sender(),
                key_store,
                ledger: ledger.clone(),
                admission,
                totals,
                admin_token,
                runtime: tokio::runtime::Handle::current(),
            },
        ));
        let restoring = app.clone();
        tokio::task::spawn_blocking(move || restore(&restoring, ledger.as_ref(), keys, groups))
            .await
            .map_err(|e| StartError::Store(e.to_string()))?
            .map_err(|e| StartError::Store(e.to_string()))?;
        if let Some(redis) = shared {
            tokio::spawn(follow_key_changes(Arc::downgrade(&app), redis));
        }
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
        let gate = Arc::new(ConnectionGate::new(
            config.server.max_connections,
            self.app.metrics.clone(),
        ));
        tracing::info!(bound = gate.bound(), "client connections bounded");
        let serving = Serving {
            full: Routes::new(
                self.router(),
                Some(self.app.clone()),
                config.server.body_idle_timeout,
            ),
            ops_only: Routes::new(
                ops_only_router(self.app.clone()),
                None,
                config.server.body_idle_timeout,
            ),
            header_read_timeout: config.server.header_read_timeout,
        };
        let lanes = Lanes::start(
            listener,
            serving,
            gate,
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
                    axum::serve(
                        crate::lanes::no_delay(admin_listener),
                        admin_router(self.app.clone()),
                    )
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
        let spend_watch = tokio::spawn(crate::spend_watch::watch(Arc::downgrade(&self.app)));
        let health = tokio::spawn(admin::health::sample(Arc::downgrade(&self.app)));
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
        spend_watch.abort();
        health.abort();
        if let Some(admin_server) = admin_server {
            admin_server.abort();
        }
        // Streams that ended (or were cut by the abort) settle on the blocking pool; their
        // records must reach the channel before it is flushed and closed.
        self.app.settling.close();
        self.app.settling.wait().await;
        self.app.admission.stop().await;
        self.pipeline.close().await;
        tracing::info!("usage sink flushed; bye");
        Ok(())
    }
}

/// Brings live state back from the ledger: each key's, team's and customer's spend in its
/// current budget period and each key's running totals for the month. Reservations are never
/// stored, so those of requests that a crash interrupted are simply gone.
fn restore(
    app: &App,
    ledger: &dyn LedgerReader,
    keys: Vec<crate::auth::KeyRecord>,
    groups: Vec<GroupRecord>,
) -> Result<(), crate::rating::ledger::LedgerError> {
    let now_ms = crate::unix_ms();
    if let RatingTotals::Embedded(rater) = &app.totals {
        let month = BudgetPeriod::Month.start_ms(now_ms);
        for (key_id, cursor) in ledger.cursors(month)? {
            rater.seed(&key_id, month, cursor);
        }
    }
    let mut spend_by_period = std::collections::HashMap::new();
    let mut spend_since = |start: i64| -> Result<_, crate::rating::ledger::LedgerError> {
        if let std::collections::hash_map::Entry::Vacant(slot) = spend_by_period.entry(start) {
            slot.insert(Arc::new(ledger.spend_since(start)?));
        }
        Ok(spend_by_period[&start].clone())
    };
    // Groups first: a key without a plan of its own is rated under its customer's.
    for group in groups {
        let spend = spend_since(group.budget_period.start_ms(now_ms))?;
        let spent = members_spend(&spend, &keys, group.level, &group.name);
        app.group_activated(group, Some(spent));
    }
    for key in keys {
        let key = app.effective(key);
        let spend = spend_since(app.budget_period(&key).start_ms(now_ms))?;
        let spent = spend.get(&key.id).copied().unwrap_or(Money::ZERO);
        app.key_activated(key, Some(spent));
    }
    Ok(())
}

/// Where keys and usage are kept, as the request path and the usage thread see them.
struct Store {
    keys: Arc<dyn KeyStore>,
    writer: Box<dyn UsageWriter>,
    ledger: Arc<dyn LedgerReader>,
}

fn open_store(
    backend: &StoreBackend,
    data_dir: &std::path::Path,
    durability: Durability,
    raw_retention_days: Option<u32>,
) -> Result<Store, StartError> {
    let failed = |e: &dyn std::fmt::Display| StartError::Store(e.to_string());
    match backend {
        StoreBackend::Sqlite => Ok(Store {
            keys: Arc::new(SqliteKeyStore::open(data_dir).map_err(|e| failed(&e))?),
            writer: Box::new(
                LedgerWriter::open(data_dir, durability)
                    .map_err(|e| failed(&e))?
                    .with_raw_retention(raw_retention_days),
            ),
            ledger: Arc::new(SqliteLedgerReader::new(data_dir)),
        }),
        StoreBackend::Postgres { url } => {
            let store = PgStore::connect(url).map_err(|e| failed(&e))?;
            Ok(Store {
                keys: Arc::new(store.key_store()),
                writer: Box::new(
                    store
                        .ledger_writer(durability)
                        .map_err(|e| failed(&e))?
                        .with_raw_retention(raw_retention_days),
                ),
                ledger: Arc::new(store.ledger_reader()),
            })
        }
    }
}

/// The ledger of a configuration's store, for reading it outside a running gateway.
pub fn ledger_reader(config: &Config) -> Result<Arc<dyn LedgerReader>, StartError> {
    match &config.store {
        StoreBackend::Sqlite => Ok(Arc::new(SqliteLedgerReader::new(&config.server.data_dir))),
        StoreBackend::Postgres { url } => Ok(Arc::new(
            PgStore::connect(url)
                .map_err(|e| StartError::Store(e.to_string()))?
                .ledger_reader(),
        )),
    }
}

/// Keeps this replica's key index current with the others': each announced change is loaded
/// from the store; a gap in the announced versions (a message missed while the subscription was
/// down) or a version moved without a message reloads every key. Ends with the gateway.
async fn follow_key_changes(app: std::sync::Weak<App>, redis: Arc<RedisState>) {
    // Unknown at first: the first poll reloads every key, covering changes made between the
    // start-up listing and the subscription.
    let mut seen = -1;
    let mut changes = redis.key_changes().await.ok();
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        let change = async {
            match changes.as_mut() {
                Some(changes) => changes.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            change = change => {
                let Some(app) = app.upgrade() else { return };
                match change {
                    Some((version, key_id)) if version == seen + 1 => {
                        seen = version;
                        reload_key(&app, key_id).await;
                    }
                    Some((version, _)) => {
                        seen = seen.max(version);
                        reload_keys(&app).await;
                    }
                    None => changes = None,
                }
            }
            _ = poll.tick() => {
                let Some(app) = app.upgrade() else { return };
                if changes.is_none() {
                    changes = redis.key_changes().await.ok();
                }
                if let Ok(version) = redis.key_version().await {
                    if version != seen {
                        seen = version;
                        reload_keys(&app).await;
                    }
                }
            }
        }
    }
}

async fn reload_key(app: &Arc<App>, key_id: String) {
    if let Some((level, name)) = group_change(&key_id) {
        let store = app.key_store.clone();
        match tokio::task::spawn_blocking(move || store.list_groups()).await {
            Ok(Ok(groups)) => {
                match groups
                    .into_iter()
                    .find(|g| g.level == level && g.name == name)
                {
                    Some(group) => app.group_activated(group, None),
                    None => app.group_removed(level, name),
                }
                app.refresh_members(level, name).await;
            }
            Ok(Err(error)) => tracing::error!(%error, "cannot load a changed group"),
            Err(error) => tracing::error!(%error, "cannot load a changed group"),
        }
        return;
    }
    let store = app.key_store.clone();
    let id = key_id.clone();
    match tokio::task::spawn_blocking(move || store.get(&id)).await {
        Ok(Ok(Some(record))) => app.key_activated(record, None),
        Ok(Ok(None)) => app.key_revoked(&key_id),
        Ok(Err(error)) => tracing::error!(%error, "cannot load a changed key"),
        Err(error) => tracing::error!(%error, "cannot load a changed key"),
    }
}

async fn reload_keys(app: &Arc<App>) {
    let store = app.key_store.clone();
    match tokio::task::spawn_blocking(move || {
        Ok::<_, StoreError>((store.list()?, store.list_groups()?))
    })
    .await
    {
        Ok(Ok((records, groups))) => {
            for level in [Level::Team, Level::Customer] {
                for stale in app.groups.names(level) {
                    if !groups.iter().any(|g| g.level == level && g.name == stale) {
                        app.group_removed(level, &stale);
                    }
                }
            }
            for group in groups {
                app.group_activated(group, None);
            }
            for record in records {
                app.key_activated(record, None);
            }
        }
        Ok(Err(error)) => tracing::error!(%error, "cannot reload keys"),
        Err(error) => tracing::error!(%error, "cannot reload keys"),
    }
}

/// The client API, with the admin API merged in unless it has its own listener.
pub fn router(app: Arc<App>, with_admin: bool) -> Router {
    let routes = Endpoint::ALL
        .into_iter()
        .fold(Router::new(), |routes, endpoint| {
            routes.route(endpoint.client_path(), proxy::endpoint(endpoint))
        })
        .route(
            "/v1/messages/count_tokens",
            axum::routing::post(crate::anthropic::count_tokens),
        )
        .merge(crate::responses::routes())
        .route("/v1/models", get(proxy::models))
        .route("/v1/models/{id}", get(proxy::model))
        .route("/v1/outcomes", post(crate::outcomes::report))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let routes = if with_admin {
        routes
            .merge(admin::routes(app.clone()))
            .merge(crate::console::routes())
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
        .merge(admin::routes(app.clone()))
        .merge(crate::console::routes());
    finish(routes, app)
}

/// What a connection past the bound is served: the operational endpoints, and a 503 for
/// anything else.
fn ops_only_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(at_connection_bound)
        .with_state(app)
}

async fn at_connection_bound() -> Response {
    GatewayError::AtConnectionBound.into_response()
}

fn finish(routes: Router<Arc<App>>, app: Arc<App>) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(RequestIdLayer)
        .with_state(app)
}

/// Every request carries a usable `x-request-id` from here on: the client's when it is a sane
/// token (1 to 128 visible ASCII characters), else a fresh one. It is sent upstream and echoed
/// on every response. A layer of its own rather than `from_fn`, which boxes every request's
/// future and clones the routes' service once more.
#[derive(Clone, Copy)]
struct RequestIdLayer;

impl<S> tower::Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;

    fn layer(&self, inner: S) -> RequestId<S> {
        RequestId { inner }
    }
}

#[derive(Clone)]
struct RequestId<S> {
    inner: S,
}

impl<S, B> tower::Service<axum::http::Request<B>> for RequestId<S>
where
    S: tower::Service<axum::http::Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = EchoRequestId<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: axum::http::Request<B>) -> Self::Future {
        EchoRequestId {
            id: mark_request_id(&mut request),
            inner: self.inner.call(request),
        }
    }
}

/// Gives `request` its usable `x-request-id` (see [`RequestIdLayer`]) and returns it, to be
/// echoed on the response.
fn mark_request_id<B>(request: &mut axum::http::Request<B>) -> Option<HeaderValue> {
    let usable = request.headers().get(&X_REQUEST_ID).is_some_and(|value| {
        let bytes = value.as_bytes();
        (1..=128).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_graphic)
    });
    if usable {
        request.extensions_mut().insert(ClientChoseRequestId);
    } else {
        if let Ok(value) = HeaderValue::from_maybe_shared(new_request_id_bytes()) {
            request.headers_mut().insert(X_REQUEST_ID.clone(), value);
        }
    }
    request.headers().get(&X_REQUEST_ID).cloned()
}

/// What a client listener's connections are served by: a router, and with `proxied` set, the
/// proxied endpoints' POSTs straight to [`proxy::serve`]. The router's matching, its boxed
/// per-route service and its response mapping were a twentieth of a proxied request's CPU;
/// anything else (another method, another path) still takes the router, which has the same
/// routes, so the answers are the same either way.
#[derive(Clone)]
pub struct Routes {
    router: Router,
    proxied: Option<Arc<App>>,
    /// How long a body the router reads may pause (the proxy's own reading times itself).
    body_idle: std::time::Duration,
}

type ProxiedFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<Response, std::convert::Infallible>> + Send>>;

impl Routes {
    pub fn new(
        router: Router,
        proxied: Option<Arc<App>>,
        body_idle: std::time::Duration,
    ) -> Routes {
        Routes {
            router,
            proxied,
            body_idle,
        }
    }
}

impl tower::Service<axum::extract::Request> for Routes {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::Either<
        EchoRequestId<ProxiedFuture>,
        axum::routing::future::RouteFuture<std::convert::Infallible>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: axum::extract::Request) -> Self::Future {
        let proxied = self
            .proxied
            .as_ref()
            .filter(|_| request.method() == axum::http::Method::POST)
            .and_then(|app| {
                Endpoint::at(request.uri().path()).map(|endpoint| (app.clone(), endpoint))
            });
        let Some((app, endpoint)) = proxied else {
            let idle = self.body_idle;
            let request = request.map(|body| {
                axum::body::Body::new(tower_http::timeout::TimeoutBody::new(idle, body))
            });
            return futures_util::future::Either::Right(tower::Service::call(
                &mut self.router,
                request,
            ));
        };
        futures_util::future::Either::Left(EchoRequestId {
            id: mark_request_id(&mut request),
            inner: Box::pin(async move { Ok(proxy::serve(app, endpoint, request).await) }),
        })
    }
}

pin_project_lite::pin_project! {
    pub struct EchoRequestId<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, E> Future for EchoRequestId<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take() {
            response.headers_mut().insert(X_REQUEST_ID.clone(), id);
        }
        std::task::Poll::Ready(Ok(response))
    }
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
        "shared_state": if app.admission.available() { "ok" } else { "unreachable" },
    });
    let ready = app.is_ready()
        && !config.models.is_empty()
        && !app.usage.failing()
        && app.admission.available();
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
    if app.config().server.per_key_metrics {
        export_key_gauges(&app);
    }
    if app.config().server.per_group_metrics {
        export_group_gauges(&app).await;
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

/// Each live key's budget and throttles, read when scraped rather than set by every request:
/// five gauges written from both lanes per request kept their cache lines moving between
/// the cores. Reset first, so a revoked or deleted key disappears; a key without a budget or
/// throttles has none of these series. Embedded state only, as before: with shared state the
/// figures live in Redis, one round trip per key.
fn export_key_gauges(app: &App) {
    let metrics = &app.metrics;
    metrics.key_spend_usd.reset();
    metrics.key_budget_remaining_usd.reset();
    metrics.key_budget_used_ratio.reset();
    metrics.key_remaining_requests.reset();
    metrics.key_remaining_tokens.reset();
    for key in app.keys.filtered(|key| !key.is_revoked()) {
        let label = [key.name.as_str()];
        if let Some(budget) = app.admission.budget_now(&key.id) {
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
        let Some(throttles) = app.admission.key_throttles_now(&key.id) else {
            continue;
        };
        if let Some(requests) = throttles.requests {
            metrics
                .key_remaining_requests
                .with_label_values(&label)
                .set(requests.remaining as f64);
        }
        if let Some(tokens) = throttles.tokens {
            metrics
                .key_remaining_tokens
                .with_label_values(&label)
                .set(tokens.remaining as f64);
        }
    }
}

/// Each team's and customer's live budget, read when scraped: there are few of them, and
/// their spend moves with every key's request. Reset first, so a deleted group disappears.
async fn export_group_gauges(app: &App) {
    let metrics = &app.metrics;
    let mut figures = Vec::new();
    for group in app.groups.all() {
        let record = &group.record;
        let budget = app
            .admission
            .budget(record.level, &record.name, &group.limits)
            .await;
        if let Some(budget) = budget {
            figures.push((record.level.as_str(), record.name.clone(), budget));
        }
    }
    metrics.group_spend_usd.reset();
    metrics.group_reserved_usd.reset();
    metrics.group_budget_remaining_usd.reset();
    for (level, name, budget) in figures {
        let labels = [level, name.as_str()];
        metrics
            .group_spend_usd
            .with_label_values(&labels)
            .set(budget.spend_usd.as_f64_usd());
        metrics
            .group_reserved_usd
            .with_label_values(&labels)
            .set(budget.reserved_usd.as_f64_usd());
        if budget.budget_usd != crate::limits::UNCAPPED {
            metrics
                .group_budget_remaining_usd
                .with_label_values(&labels)
                .set(budget.remaining_usd.as_f64_usd());
        }
    }
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

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}
