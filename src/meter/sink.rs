//! The path usage events take off the hot path: a bounded channel into one dedicated thread
//! that writes them in batches through a [`UsageWriter`]. The request path never waits on it.
//!
//! When the channel is full the event is dropped, not waited for: a gateway that stalls client
//! traffic because its ledger is slow turns a storage hiccup into an outage. Every drop is
//! counted in `tollgate_usage_events_total{result="dropped"}` and logged, so it is visible and
//! alertable; the channel is sized (`server.usage_channel_capacity`) so that this only happens
//! when the writer is down or far behind.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use super::record::MeterEvent;
use crate::metrics::Metrics;

/// How far the ledger commits a request's record before its client sees the answer end
/// (see `rating::ledger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Batched,
    Strict,
}

/// Where batches of events end up: the SQLite ledger; a shared database for fleets of replicas
/// would be another.
pub trait UsageWriter: Send + 'static {
    /// Writes a batch durably enough for the writer's own guarantee, all or nothing. It must
    /// be idempotent — an event already written is skipped, never written twice — because a
    /// failed batch is tried again.
    fn write_batch(&mut self, events: &[MeterEvent]) -> Result<(), SinkError>;

    /// The least time between two commits. Waiting lets events gather into one commit instead
    /// of one each; a writer whose callers wait for the commit keeps the default of none.
    fn commit_interval(&self) -> Duration {
        Duration::ZERO
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The storage failed (I/O, a full disk, a lock held too long): the same batch may be
    /// written once it recovers.
    #[error("usage storage failed: {0}")]
    Storage(String),
    /// The batch itself was refused: writing it again would fail again.
    #[error("usage batch refused: {0}")]
    Refused(String),
}

/// Answers `Ok` once the event has been committed, `Err` when it never will be (dropped on a
/// full channel, or it still failed to write after the retries): strict durability withholds
/// the answer then.
pub type WrittenAck = oneshot::Receiver<()>;

#[allow(clippy::large_enum_variant)] // see MeterEvent
enum Envelope {
    Event(MeterEvent, Option<oneshot::Sender<()>>),
    /// Answered once everything queued before it has been written (or has failed to be).
    Flush(oneshot::Sender<()>),
    Close(oneshot::Sender<()>),
}

/// Whether usage is being recorded, for readiness: a replica whose ledger fails should be
/// drained by its load balancer rather than keep serving unbilled (or, strict, refused) traffic.
#[derive(Default)]
struct Health {
    /// When a write last failed or an event was dropped on a full channel, in Unix ms; 0 after
    /// a batch is written.
    last_failure_ms: AtomicI64,
}

/// How long after a failure the sink reports itself failing. Past it, readiness returns so that
/// traffic finds out whether the ledger has recovered: a replica drained for good would never
/// write again to learn that it can.
const FAILING_FOR: Duration = Duration::from_secs(10);

impl Health {
    fn failed(&self) {
        self.last_failure_ms
            .store(crate::unix_ms(), Ordering::Relaxed);
    }
}

/// The hot path's end of the channel. Cheap to clone.
#[derive(Clone)]
pub struct UsageSender {
    tx: mpsc::Sender<Envelope>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Unparked by a flush or close, which a writer between polls would otherwise only see
    /// at its next one.
    writer: std::thread::Thread,
}

impl UsageSender {
    /// True while writes failed or events were dropped in the last few seconds, and no batch
    /// has been written since.
    pub fn failing(&self) -> bool {
        let last_failure = self.health.last_failure_ms.load(Ordering::Relaxed);
        last_failure != 0
            && crate::unix_ms().saturating_sub(last_failure) < FAILING_FOR.as_millis() as i64
    }

    /// Queues an event without waiting. Returns `false` when it was dropped (see module docs).
    pub fn submit(&self, event: MeterEvent) -> bool {
        self.send(Envelope::Event(event, None))
    }

    /// Queues an event and returns a receiver that resolves once it has been written. A
    /// dropped event drops its sender with it, so the receiver reports it unwritten.
    pub fn submit_acked(&self, event: MeterEvent) -> WrittenAck {
        let (ack, written) = oneshot::channel();
        self.send(Envelope::Event(event, Some(ack)));
        written
    }

    /// Waits until every event queued before this call has been through a commit, so that a
    /// reader of the ledger sees them. Waits for room in the channel rather than failing.
    pub async fn flushed(&self) {
        let (done, flushed) = oneshot::channel();
        if self.tx.send(Envelope::Flush(done)).await.is_ok() {
            self.writer.unpark();
            let _ = flushed.await;
        }
    }

    fn send(&self, envelope: Envelope) -> bool {
        match self.tx.try_send(envelope) {
            Ok(()) => {
                let hot = self.metrics.hot();
                hot.usage_pending.inc();
                hot.usage_queued.inc();
                true
            }
            Err(_) => {
                self.health.failed();
                self.metrics
                    .hot()
                    .usage_events
                    .with_label_values(&["dropped"])
                    .inc();
                tracing::error!("usage channel full or closed: usage event dropped");
                false
            }
        }
    }
}

/// The writer thread and the way to stop it.
pub struct UsagePipeline {
    sender: UsageSender,
    thread: Option<JoinHandle<()>>,
}

/// The most events one commit takes. The ledger's cost per commit is dominated by the index
/// pages it dirties, so under saturation bigger batches are cheaper per record (1,024 reached
/// about 60,000 records/s in `cargo bench --bench rating`, 4,096 about 80,000).
pub const MAX_BATCH: usize = 4096;

impl UsagePipeline {
    pub fn start(
        writer: Box<dyn UsageWriter>,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<UsagePipeline> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let thread_metrics = metrics.clone();
        let health = Arc::new(Health::default());
        let thread_health = health.clone();
        let thread = std::thread::Builder::new()
            .name("tollgate-usage".to_owned())
            .spawn(move || run_writer(writer, rx, &thread_metrics, &thread_health))?;
        Ok(UsagePipeline {
            sender: UsageSender {
                tx,
                metrics,
                health,
                writer: thread.thread().clone(),
            },
            thread: Some(thread),
        })
    }

    pub fn sender(&self) -> UsageSender {
        self.sender.clone()
    }

    /// Writes everything queued so far, then stops the thread. Waits for room in the channel
    /// rather than dropping: at shutdown nothing may be lost.
    pub async fn close(mut self) {
        let (done, closed) = oneshot::channel();
        if self.sender.tx.send(Envelope::Close(done)).await.is_ok() {
            self.sender.writer.unpark();
            let _ = closed.await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// How long after its last event a batched writer goes on polling for more before it waits
/// to be woken: long enough to span the gaps of light traffic, short enough that an idle
/// gateway soon stops waking up.
const POLLING_FOR: Duration = Duration::from_secs(1);

/// The waits before each new try of a failed batch, about 3 s in all. A ledger on a full or
/// failing disk often recovers within that (space freed, a transient I/O error); meanwhile the
/// channel keeps queueing, strict requests keep waiting, and readiness reports the failure.
const RETRY_DELAYS: [Duration; 6] = [
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
    Duration::from_millis(1_600),
];

fn run_writer(
    mut writer: Box<dyn UsageWriter>,
    mut rx: mpsc::Receiver<Envelope>,
    metrics: &Metrics,
    health: &Health,
) {
    let mut events = Vec::with_capacity(MAX_BATCH);
    // One per event, in the same order, so that a batch written in parts can answer exactly
    // the events that made it.
    let mut acks: Vec<Option<oneshot::Sender<()>>> = Vec::with_capacity(MAX_BATCH);
    let mut flushes = Vec::new();
    let interval = writer.commit_interval();
    let mut last_event: Option<Instant> = None;
    loop {
        // A batched writer that saw events lately looks for the next ones itself, once per
        // interval: waiting on the channel instead means that each request's record wakes
        // it, and under light traffic that wake-up is paid on the request's path, between
        // its settlement and the writing of its answer.
        let polling =
            !interval.is_zero() && last_event.is_some_and(|at| at.elapsed() < POLLING_FOR);
        let first = if polling {
            std::thread::park_timeout(interval);
            match rx.try_recv() {
                Ok(first) => first,
                Err(TryRecvError::Empty) => continue,
                Err(TryRecvError::Disconnected) => return,
            }
        } else {
            let Some(first) = rx.blocking_recv() else {
                return;
            };
            // Gather before the commit, not after it: the event that wakes an idle writer is
            // sent just before its request's answer is written, and a commit started at once
            // would take the CPU from that answer (the scheduler favours a thread that slept).
            if !interval.is_zero() && matches!(first, Envelope::Event(..)) {
                std::thread::park_timeout(interval);
            }
            first
        };
        if matches!(first, Envelope::Event(..)) {
            last_event = Some(Instant::now());
        }
        let mut close = None;
        let mut next = Some(first);
        // Take whatever is already queued, up to a batch: one commit for many events is what
        // makes the ledger fast, and under light load a batch is simply one event.
        while let Some(envelope) = next.take() {
            match envelope {
                Envelope::Event(event, ack) => {
                    events.push(event);
                    acks.push(ack);
                }
                Envelope::Flush(done) => {
                    flushes.push(done);
                    break;
                }
                Envelope::Close(done) => {
                    close = Some(done);
                    break;
                }
            }
            if events.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !events.is_empty() {
            write(&mut *writer, &events, &mut acks, metrics, health);
            metrics.hot().usage_pending.sub(events.len() as i64);
            events.clear();
            acks.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
        if let Some(done) = close {
            let _ = done.send(());
            return;
        }
    }
}

/// Writes a batch, trying again after each of [`RETRY_DELAYS`] while the storage fails. When
/// it still fails, or the batch itself was refused, its halves are written apart, so that the
/// events the ledger refuses lose only themselves. Answers the acks of the events written; the
/// others are dropped unanswered, which fails the strict requests waiting on them.
fn write(
    writer: &mut dyn UsageWriter,
    events: &[MeterEvent],
    acks: &mut [Option<oneshot::Sender<()>>],
    metrics: &Metrics,
    health: &Health,
) {
    let mut delays = RETRY_DELAYS.iter();
    let error = loop {
        let started = Instant::now();
        let result = writer.write_batch(events);
        metrics
            .usage_batch_duration
            .observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(()) => {
                written(events.len(), acks, metrics, health);
                return;
            }
            Err(error) => error,
        };
        health.failed();
        let retry = match error {
            SinkError::Storage(_) => delays.next(),
            SinkError::Refused(_) => None,
        };
        let Some(delay) = retry else { break error };
        tracing::warn!(%error, events = events.len(), retry_in = ?delay, "usage batch write failed");
        metrics.usage_batch_retries.inc();
        std::thread::sleep(*delay);
    };
    let lost = write_halves(writer, events, acks, metrics, health);
    if lost > 0 {
        tracing::error!(%error, lost, "usage events could not be written");
        health.failed();
        metrics
            .hot()
            .usage_events
            .with_label_values(&["failed"])
            .inc_by(lost);
    }
}

/// Writes the two halves of a batch that failed as a whole, and their halves in turn, so that
/// a few refused events among thousands are found in a few dozen commits. Returns how many
/// events were lost.
fn write_halves(
    writer: &mut dyn UsageWriter,
    events: &[MeterEvent],
    acks: &mut [Option<oneshot::Sender<()>>],
    metrics: &Metrics,
    health: &Health,
) -> u64 {
    if events.len() < 2 {
        return events.len() as u64;
    }
    let middle = events.len() / 2;
    let (first, second) = events.split_at(middle);
    let (first_acks, second_acks) = acks.split_at_mut(middle);
    let mut lost = 0;
    for (half, half_acks) in [(first, first_acks), (second, second_acks)] {
        match writer.write_batch(half) {
            Ok(()) => written(half.len(), half_acks, metrics, health),
            Err(_) => lost += write_halves(writer, half, half_acks, metrics, health),
        }
    }
    lost
}

fn written(
    count: usize,
    acks: &mut [Option<oneshot::Sender<()>>],
    metrics: &Metrics,
    health: &Health,
) {
    health.last_failure_ms.store(0, Ordering::Relaxed);
    metrics
        .hot()
        .usage_events
        .with_label_values(&["written"])
        .inc_by(count as u64);
    for ack in acks.iter_mut().filter_map(Option::take) {
        let _ = ack.send(());
    }
}
