//! Client connections are served by lanes: one single-threaded runtime per core, each with its
//! own provider connection pools (`config::Upstream::client`). A request's client connection,
//! its provider connection and its timers then live on one thread. On tokio's work-stealing
//! runtime they hopped between workers — a cross-thread wake-up at each hand-over — which cost
//! 15–50 µs per request at 1 connection and ~15 % of the throughput at 64 on two cores.
//!
//! One acceptor on the caller's runtime deals accepted connections to the lanes in turn; a
//! connection stays on its lane for its life.
//!
//! Hostile clients are bounded here: a request head must arrive within a time (which also
//! ends an idle keep-alive connection), a body may not pause longer than another (see
//! `Routes`), and open connections are bounded (see [`ConnectionGate`]) so that a flood
//! cannot take the file descriptors the gateway needs.

use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::metrics::Metrics;
use crate::server::Routes;

/// Connections past the bound that are still served for `/healthz`, `/readyz` and
/// `/metrics` (anything else gets a 503), so that probes and scrapes see a gateway at its
/// limit rather than a dead one; past these, new connections are closed at once.
pub const OPS_HEADROOM: usize = 64;

/// The bound on open client connections, and the count against it.
pub struct ConnectionGate {
    open: AtomicUsize,
    bound: usize,
    /// Whether this episode of being at the bound was logged already.
    at_bound: AtomicBool,
    metrics: Arc<Metrics>,
}

/// How an accepted connection is served.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admit {
    Full,
    OpsOnly,
    Close,
}

impl ConnectionGate {
    /// `configured` connections, or (0) half the open-file limit less a reserve: each
    /// proxied request also holds a provider connection, and the ledger, Redis and
    /// PostgreSQL need descriptors of their own.
    pub fn new(configured: usize, metrics: Arc<Metrics>) -> ConnectionGate {
        let bound = match configured {
            0 => {
                let files =
                    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1_024, |(soft, _)| soft);
                (usize::try_from(files)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(512)
                    / 2)
                .clamp(64, 100_000)
            }
            n => n,
        };
        ConnectionGate {
            open: AtomicUsize::new(0),
            bound,
            at_bound: AtomicBool::new(false),
            metrics,
        }
    }

    pub fn bound(&self) -> usize {
        self.bound
    }

    fn admit(&self) -> Admit {
        let open = self.open.load(Ordering::Acquire);
        if open < self.bound {
            if open < self.bound - self.bound / 10 && self.at_bound.swap(false, Ordering::AcqRel) {
                tracing::info!(
                    open,
                    bound = self.bound,
                    "client connections back under the bound"
                );
            }
            return Admit::Full;
        }
        if !self.at_bound.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                open,
                bound = self.bound,
                "client connection bound reached: new connections serve only /healthz, /readyz and /metrics, or are closed"
            );
        }
        match open < self.bound + OPS_HEADROOM {
            true => {
                self.metrics
                    .connections_shed
                    .with_label_values(&["ops_only"])
                    .inc();
                Admit::OpsOnly
            }
            false => {
                self.metrics
                    .connections_shed
                    .with_label_values(&["closed"])
                    .inc();
                Admit::Close
            }
        }
    }

    fn opened(self: &Arc<Self>) -> OpenConnection {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.metrics.client_connections.inc();
        OpenConnection(self.clone())
    }
}

/// Counts a connection as open until dropped.
struct OpenConnection(Arc<ConnectionGate>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.client_connections.dec();
    }
}

/// What a lane serves: the full routes (proxied POSTs straight to the proxy), the operational
/// endpoints for connections past the bound, and the timeouts on a client's request head and
/// body.
#[derive(Clone)]
pub struct Serving {
    pub full: Routes,
    pub ops_only: Routes,
    pub header_read_timeout: Duration,
}

/// The running lanes. Dropping the sender side (when the acceptor ends) starts their drain.
pub struct Lanes {
    threads: Vec<std::thread::JoinHandle<bool>>,
}

impl Lanes {
    /// Starts `count` lanes and the acceptor feeding them from `listener`.
    /// Once `stop` turns true the acceptor stops, every connection is asked to finish (HTTP
    /// keep-alive ends after the request in flight) and each lane waits up to `grace` before
    /// cutting what is left.
    pub fn start(
        listener: TcpListener,
        serving: Serving,
        gate: Arc<ConnectionGate>,
        stop: watch::Receiver<bool>,
        grace: Duration,
        count: usize,
    ) -> std::io::Result<Lanes> {
        let count = count.max(1);
        let mut senders = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let (sender, incoming) = mpsc::unbounded_channel();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (serving, stop) = (serving.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("tollgate-lane-{index}"))
                .spawn(move || {
                    crate::metrics::use_lane_shard(index);
                    runtime.block_on(serve_lane(incoming, serving, stop, grace))
                })?;
            senders.push(sender);
            threads.push(thread);
        }
        tokio::spawn(accept(listener, senders, gate, stop));
        Ok(Lanes { threads })
    }

    /// Waits for every lane to drain; true when no connection had to be cut.
    pub async fn drained(self) -> bool {
        tokio::task::spawn_blocking(move || {
            // Every lane is joined, even after one that had to cut connections.
            let drained: Vec<bool> = self
                .threads
                .into_iter()
                .map(|thread| thread.join().unwrap_or(false))
                .collect();
            drained.into_iter().all(|lane_drained| lane_drained)
        })
        .await
        .unwrap_or(false)
    }
}

/// An accepted connection on its way to a lane.
struct Handed {
    stream: std::net::TcpStream,
    open: OpenConnection,
    ops_only: bool,
}

async fn accept(
    listener: TcpListener,
    lanes: Vec<mpsc::UnboundedSender<Handed>>,
    gate: Arc<ConnectionGate>,
    mut stop: watch::Receiver<bool>,
) {
    for lane in (0..lanes.len()).cycle() {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let admit = gate.admit();
                if admit == Admit::Close {
                    drop(stream);
                    continue;
                }
                set_no_delay(&stream);
                match stream.into_std() {
                    Ok(stream) => {
                        let _ = lanes[lane].send(Handed {
                            stream,
                            open: gate.opened(),
                            ops_only: admit == Admit::OpsOnly,
                        });
                    }
                    Err(error) => tracing::debug!(%error, "cannot hand a connection over"),
                }
            }
            Err(error) if is_connection_error(&error) => {}
            Err(error) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tracing::error!(%error, "accept failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

async fn serve_lane(
    mut incoming: mpsc::UnboundedReceiver<Handed>,
    serving: Serving,
    stop: watch::Receiver<bool>,
    grace: Duration,
) -> bool {
    let mut connections = JoinSet::new();
    while let Some(handed) = incoming.recv().await {
        match TcpStream::from_std(handed.stream) {
            Ok(stream) => {
                let routes = match handed.ops_only {
                    true => serving.ops_only.clone(),
                    false => serving.full.clone(),
                };
                let header_read = serving.header_read_timeout;
                let open = handed.open;
                let stop = stop.clone();
                connections.spawn(async move {
                    serve_connection(stream, routes, header_read, stop).await;
                    drop(open);
                });
            }
            Err(error) => tracing::debug!(%error, "cannot register a connection"),
        }
        while connections.try_join_next().is_some() {}
    }
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_ok() {
        return true;
    }
    tracing::warn!("grace period over: closing the remaining connections");
    // Cut here, inside the running lane, so that a cut stream still settles its request.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    false
}

/// `header_read`: how long the request head may take (a body's pauses are timed by `Routes`).
async fn serve_connection(
    stream: TcpStream,
    routes: Routes,
    header_read: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let service = TowerToHyperService::new(
        routes.map_request(|request: Request<Incoming>| request.map(Body::new)),
    );
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read);
    let mut connection =
        pin!(builder.serve_connection_with_upgrades(TokioIo::new(stream), service));
    let mut stopping = pin!(stop.wait_for(|stop| *stop));
    let mut draining = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::trace!(%error, "connection ended with an error");
                }
                return;
            }
            _ = &mut stopping, if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Accepted connections with Nagle's algorithm off (see [`set_no_delay`]).
pub fn no_delay(listener: TcpListener) -> impl axum::serve::Listener<Addr = std::net::SocketAddr> {
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
