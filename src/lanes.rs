//! Client connections are served by lanes: one single-threaded runtime per core, each with its
//! own provider connection pools (`config::Upstream::client`). A request's client connection,
//! its provider connection and its timers then live on one thread. On tokio's work-stealing
//! runtime they hopped between workers — a cross-thread wake-up at each hand-over — which cost
//! 15–50 µs per request at 1 connection and ~15 % of the throughput at 64 on two cores.
//!
//! One acceptor on the caller's runtime deals accepted connections to the lanes in turn; a
//! connection stays on its lane for its life.

use std::pin::pin;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tower::ServiceExt;

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
        router: Router,
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
            let (router, stop) = (router.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("tollgate-lane-{index}"))
                .spawn(move || runtime.block_on(serve_lane(incoming, router, stop, grace)))?;
            senders.push(sender);
            threads.push(thread);
        }
        tokio::spawn(accept(listener, senders, stop));
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

async fn accept(
    listener: TcpListener,
    lanes: Vec<mpsc::UnboundedSender<std::net::TcpStream>>,
    mut stop: watch::Receiver<bool>,
) {
    for lane in (0..lanes.len()).cycle() {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                set_no_delay(&stream);
                match stream.into_std() {
                    Ok(stream) => {
                        let _ = lanes[lane].send(stream);
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
    mut incoming: mpsc::UnboundedReceiver<std::net::TcpStream>,
    router: Router,
    stop: watch::Receiver<bool>,
    grace: Duration,
) -> bool {
    let mut connections = JoinSet::new();
    while let Some(stream) = incoming.recv().await {
        match TcpStream::from_std(stream) {
            Ok(stream) => {
                connections.spawn(serve_connection(stream, router.clone(), stop.clone()));
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

async fn serve_connection(stream: TcpStream, router: Router, mut stop: watch::Receiver<bool>) {
    let service = TowerToHyperService::new(
        router.map_request(|request: Request<Incoming>| request.map(Body::new)),
    );
    let builder = auto::Builder::new(TokioExecutor::new());
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
