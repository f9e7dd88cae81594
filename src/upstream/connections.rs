//! Connections to a plain-HTTP upstream: each lane keeps its own idle HTTP/1.1 connections and
//! sends on them directly, with no lock and nothing shared between lanes. hyper_util's pooled
//! client, which TLS upstreams still go through, took about a sixth of a request's CPU in the
//! load test (its pool's lock, a connector cloned and a Host header formatted per request, a
//! checkout future racing a connect future): an A/B run measured 42 µs per request against 51.
//!
//! A connection has no task of its own: the request using it drives it, while waiting for the
//! response head and then through [`UpstreamBody`] while its body is read, and gives it back
//! at the body's end. A spawned connection task took two more task turns a request (the
//! request handed over, the answer handed back) and one more each streamed chunk.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::http::header::{HeaderValue, HOST};
use hyper::http::{Request, Uri};
use hyper_util::rt::TokioIo;
use thread_local::ThreadLocal;

use super::{unreachable, Reply, CONNECT_FAILED, PROTOCOL_ERROR};
use crate::error::GatewayError;

/// Idle connections a lane keeps to one upstream; one more is closed when it comes back.
const MAX_IDLE: usize = 1024;

type Connection = http1::Connection<TokioIo<tokio::net::TcpStream>, Full<Bytes>>;

/// One HTTP/1.1 connection: what sends on it, and the connection itself, which does the
/// reading and writing whenever it is polled.
struct Link {
    sender: SendRequest<Full<Bytes>>,
    connection: Box<Connection>,
}

impl Link {
    /// Lets the connection read and write what it can; ready once it has ended (the upstream
    /// closed it, or it failed), when it can serve nothing more.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut *self.connection).poll(cx).map(|_| ())
    }
}

pub struct Connections {
    /// `host:port`, to connect to.
    address: String,
    /// The `Host` header: the port only when it is not 80, as clients write it.
    host: HeaderValue,
    connect_timeout: Duration,
    idle: ThreadLocal<RefCell<Vec<Link>>>,
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

    /// Sends `request` (its URI absolute) and waits for the response head. The connection
    /// travels with the response's body, which gives it back to this lane's idle ones once it
    /// has been read to the end.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Reply, GatewayError> {
        let mut parts = std::mem::take(request.uri_mut()).into_parts();
        parts.scheme = None;
        parts.authority = None;
        *request.uri_mut() = Uri::from_parts(parts)
            .map_err(|_| GatewayError::Internal("upstream path not in origin form".to_owned()))?;
        request.headers_mut().insert(HOST, self.host.clone());
        loop {
            let (link, fresh) = match self.take_ready() {
                Some(link) => (link, false),
                None => (self.connect().await?, true),
            };
            let Link {
                mut sender,
                connection,
            } = link;
            let mut connection = Some(connection);
            let mut answer = std::pin::pin!(sender.try_send_request(request));
            let answered = std::future::poll_fn(|cx| {
                if let Some(open) = connection.as_mut() {
                    // An ended connection is dropped, which fails the request it held.
                    if Pin::new(&mut **open).poll(cx).is_ready() {
                        connection = None;
                    }
                }
                answer.as_mut().poll(cx)
            })
            .await;
            match answered {
                Ok(response) => {
                    let link = connection.map(|connection| Link { sender, connection });
                    return Ok(response.map(|body| UpstreamBody::driving(body, self, link)));
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

    /// The most recently given back connection that is ready for a request. One the upstream
    /// closed while it sat idle is seen closed by the first drive of its next request, before
    /// that request is written, and the request goes on another.
    fn take_ready(&self) -> Option<Link> {
        let mut idle = self.idle.get_or_default().borrow_mut();
        while let Some(link) = idle.pop() {
            if link.sender.is_ready() {
                return Some(link);
            }
        }
        None
    }

    /// Keeps a connection whose answer was read whole, once it is ready for the next request:
    /// if reading the answer's end did not leave it so, one more drive does.
    fn give_back(&self, mut link: Link, cx: &mut Context<'_>) {
        if !link.sender.is_ready() && (link.drive(cx).is_ready() || !link.sender.is_ready()) {
            return;
        }
        let mut idle = self.idle.get_or_default().borrow_mut();
        if idle.len() < MAX_IDLE {
            idle.push(link);
        }
    }

    async fn connect(&self) -> Result<Link, GatewayError> {
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
        Ok(Link {
            sender,
            connection: Box::new(connection),
        })
    }
}

/// An upstream answer's body. On a connection of [`Connections`] it drives that connection
/// as it is read, and gives it back at its end; dropped before its end, it closes it (the
/// rest of the answer would be read by the next request). Through the TLS client it is the
/// body as hyper gives it.
pub struct UpstreamBody {
    body: Incoming,
    link: Option<(Link, Arc<Connections>)>,
}

impl UpstreamBody {
    fn driving(body: Incoming, connections: &Arc<Connections>, link: Option<Link>) -> Self {
        UpstreamBody {
            body,
            link: link.map(|link| (link, connections.clone())),
        }
    }

    /// Whether reading this body is what moves its bytes: no other task hands them over.
    pub fn drives_its_connection(&self) -> bool {
        self.link.is_some()
    }
}

impl From<Incoming> for UpstreamBody {
    fn from(body: Incoming) -> Self {
        UpstreamBody { body, link: None }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut frame = Pin::new(&mut this.body).poll_frame(cx);
        if frame.is_pending() {
            if let Some((link, _)) = this.link.as_mut() {
                // What the connection reads goes to the body: only an empty body needs it
                // driven, and an ended connection has handed over all it will.
                if link.drive(cx).is_ready() {
                    this.link = None;
                }
                frame = Pin::new(&mut this.body).poll_frame(cx);
            }
        }
        let ended = match &frame {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.body.is_end_stream(),
            _ => false,
        };
        if ended {
            if let Some((link, connections)) = this.link.take() {
                connections.give_back(link, cx);
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
