//! Connections to a plain-HTTP upstream: each lane keeps its own idle HTTP/1.1 connections and
//! sends on them directly, with no lock and nothing shared between lanes. hyper_util's pooled
//! client, which TLS upstreams still go through, took about a sixth of a request's CPU in the
//! load test (its pool's lock, a connector cloned and a Host header formatted per request, a
//! checkout future racing a connect future): an A/B run measured 42 µs per request against 51.

use std::cell::RefCell;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::http::header::{HeaderValue, HOST};
use hyper::http::{Request, Uri};
use hyper_util::rt::TokioIo;
use thread_local::ThreadLocal;

use super::{unreachable, Reply, CONNECT_FAILED, PROTOCOL_ERROR};
use crate::error::GatewayError;

/// Idle connections a lane keeps to one upstream; one more is closed when it comes back.
const MAX_IDLE: usize = 1024;

pub struct Connections {
    /// `host:port`, to connect to.
    address: String,
    /// The `Host` header: the port only when it is not 80, as clients write it.
    host: HeaderValue,
    connect_timeout: Duration,
    idle: ThreadLocal<RefCell<Vec<SendRequest<Full<Bytes>>>>>,
}

impl Connections {
    /// For an `http://` upstream; `None` for any other (those go through the TLS client).
    pub fn for_uri(uri: &Uri, connect_timeout: Duration) -> Option<Connections> {
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let host = uri.host()?;
        let port = uri.port_u16().unwrap_or(80);
        let host_header = match port {
            80 => host.to_owned(),
            _ => format!("{host}:{port}"),
        };
        Some(Connections {
            address: format!("{host}:{port}"),
            host: HeaderValue::from_str(&host_header).ok()?,
            connect_timeout,
            idle: ThreadLocal::new(),
        })
    }

    /// Sends `request` (its URI absolute) and waits for the response head. The connection goes
    /// back to this lane's idle ones at once; it is taken again only once it is ready, that is
    /// once this response's body has been read.
    pub async fn send(&self, mut request: Request<Full<Bytes>>) -> Result<Reply, GatewayError> {
        let mut parts = std::mem::take(request.uri_mut()).into_parts();
        parts.scheme = None;
        parts.authority = None;
        *request.uri_mut() = Uri::from_parts(parts)
            .map_err(|_| GatewayError::Internal("upstream path not in origin form".to_owned()))?;
        request.headers_mut().insert(HOST, self.host.clone());
        loop {
            let (mut sender, fresh) = match self.take_ready() {
                Some(sender) => (sender, false),
                None => (self.connect().await?, true),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.give_back(sender);
                    return Ok(response);
                }
                Err(mut failed) => match failed.take_message() {
                    // An idle connection the upstream had closed fails before anything is
                    // written: the request goes on another one (hyper_util's client does the
                    // same), and at the latest on a new one.
                    Some(unsent) if !fresh => request = unsent,
                    _ => {
                        tracing::debug!(error = %failed.into_error(), "upstream exchange failed");
                        return Err(unreachable(PROTOCOL_ERROR));
                    }
                },
            }
        }
    }

    /// The most recently given back connection that is ready for a request (those given back
    /// since are still reading their answers); closed ones met on the way are dropped.
    fn take_ready(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.get_or_default().borrow_mut();
        let mut at = idle.len();
        while at > 0 {
            at -= 1;
            if idle[at].is_ready() {
                return Some(idle.swap_remove(at));
            }
            if idle[at].is_closed() {
                idle.swap_remove(at);
            }
        }
        None
    }

    fn give_back(&self, sender: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.get_or_default().borrow_mut();
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, GatewayError> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(self.address.as_str()),
        )
        .await
        .map_err(|_| GatewayError::UpstreamTimeout)?
        .map_err(|_| unreachable(CONNECT_FAILED))?;
        stream
            .set_nodelay(true)
            .map_err(|_| unreachable(CONNECT_FAILED))?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| unreachable(CONNECT_FAILED))?;
        // Runs on this lane until the upstream closes the connection or its sender is dropped.
        tokio::spawn(connection);
        Ok(sender)
    }
}
