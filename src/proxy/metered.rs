//! The client's body for a streamed answer: bytes pass through the SSE tap untouched while it
//! reads usage and output, and the request settles exactly once — at the end of the stream, on
//! an upstream error or idle timeout, or when the client goes away.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http_body_util::{BodyDataStream, BodyExt};
use hyper::body::Incoming;
use tokio::sync::oneshot;

use super::settle::Ending;
use super::Exchange;
use crate::meter::record::{Name, Outcome};
use crate::meter::sink::Durability;
use crate::meter::sink::WrittenAck;
use crate::stream::{Gathered, SseTap};
use crate::upstream;

/// Scheduler turns a stream waits for events already read upstream before it sends what it
/// has: handing one event over takes hyper's connection task about two turns.
const GATHER_TURNS: u8 = 2;

/// The client's body for a streamed answer. Bytes pass through the tap as they arrive; the
/// request settles exactly once — at the end of the stream, on an upstream error or timeout,
/// or (through `Drop`) when the client goes away, which also drops and so cancels the upstream
/// request.
pub(super) struct MeteredStream {
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
    pub(super) fn new(
        exchange: Exchange,
        reply: upstream::Reply,
        strip_usage_chunk: bool,
        idle_timeout: Duration,
    ) -> MeteredStream {
        MeteredStream {
            upstream: reply.into_body().into_data_stream(),
            tap: SseTap::new(strip_usage_chunk),
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            idle_timeout,
            first_byte: None,
            strict: exchange.config.durability == Durability::Strict,
            ended: false,
            failure: None,
            gathered: Gathered::default(),
            yielded: 0,
            held: None,
            exchange: Some(exchange),
        }
    }

    /// Settles the stream's request. In strict durability the receiver answers once its
    /// record is committed; `None` means there is nothing to wait for.
    fn settle(&mut self, outcome: Outcome, status: u16) -> Option<WrittenAck> {
        let mut exchange = self.exchange.take()?;
        let inline = self.tap.output.text_len() <= exchange.config.server.inline_count_max_bytes;
        let output = std::mem::take(&mut self.tap.output);
        let reported = self.tap.usage;
        let response_id = self.tap.response_id.take();
        let ttft = self.first_byte;
        let tokenizer = exchange.app.tokenizer;
        let settling = exchange.app.settling.clone();
        let finish = move || {
            if let Some(model) = &exchange.model {
                exchange.counted.output = output.finish(&tokenizer, model.encoding);
            }
            let finish_reason = output.finish_reason().map(Name::from);
            exchange.settle(Ending {
                answered: true,
                status,
                outcome,
                reported,
                finish_reason,
                ttft,
                response_id,
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
