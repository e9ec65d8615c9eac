//! The distributed worker: one consumer thread, a fixed pool of worker threads, and a
//! reconciler on a timer thread.
//!
//! ```text
//!             deliveries (bounded by prefetch)            publish successors (confirms)
//!  RabbitMQ ──► consumer thread ──crossbeam──► worker threads ──► PostgreSQL / Redis / RabbitMQ
//!                   ▲                               │
//!                   └──── done: ack / reject ───────┘   (acks go out on the consuming channel)
//! ```
//!
//! A delivery is acked only after its effects are committed and its successor jobs are
//! confirmed by the broker (see [`job`] for the crash windows). A worker thread hands the
//! tail of a job whose node executed (commit, coordinate, publish) off to be run in a batch
//! with other threads' tails (module `tail`), and takes its next delivery meanwhile. When
//! the connection is lost the session ends — unacked deliveries go back to the queue — and
//! the worker reconnects with backoff. [`WorkerHandle::shutdown`] stops consuming, lets in-flight jobs finish and
//! be acked, then closes cleanly.

mod acks;
mod job;
mod pause;
mod tail;

use tail::{Leader, PendingTail};

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use amiquip::{Connection, ConsumerMessage, ConsumerOptions, Delivery};
use crossbeam_channel::{unbounded, Receiver, Select, Sender};

use crate::amqp::{self, AmqpError, AsyncPublisher, ConfirmPublisher, ConfirmTracker, JobSink};
use crate::blueprint::Blueprint;
use crate::coordination::{CoordinationError, RedisCoordinationStore, RedisPool, DEFAULT_PREFIX};
use crate::group::Combiner;
use crate::local::DEFAULT_MAX_ITERATIONS;
use crate::node::NodeRegistry;
use crate::reconciler::Reconciler;
use crate::store::{PgPool, RunStore, StoreError, Tables};

/// Default job queue.
pub const DEFAULT_QUEUE: &str = "flowcraft-jobs";
/// Default fanout exchange of webhook events.
pub const DEFAULT_EVENTS_EXCHANGE: &str = "flowcraft-events";
/// Default base of webhook URLs.
pub const DEFAULT_PUBLIC_URL: &str = "http://127.0.0.1:8080";

/// How often a delivery may fail on a service error before it is dead-lettered (with the
/// workers' backoff, about a minute and a half of outage).
const MAX_DELIVERY_FAILURES: u32 = 20;

/// Errors of the distributed worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Coordination(#[from] CoordinationError),
    #[error("invalid worker options: {0}")]
    Options(String),
    #[error("a worker thread panicked")]
    Panicked,
}

impl From<amiquip::Error> for WorkerError {
    fn from(e: amiquip::Error) -> Self {
        WorkerError::Amqp(AmqpError::from(e))
    }
}

/// State every worker thread shares.
pub(crate) struct Shared {
    pub blueprints: HashMap<String, Arc<Blueprint>>,
    pub registry: NodeRegistry,
    pub store: RunStore,
    pub coord: RedisCoordinationStore,
    pub queue: String,
    pub max_iterations: u32,
    /// Base of webhook URLs (`<public_url>/webhooks/<run>/<node>`).
    pub public_url: String,
    pub events_exchange: String,
    /// Runs with a node executing right now, and how many (the heartbeat touches them).
    pub executing: Mutex<HashMap<String, usize>>,
}

impl Shared {
    /// Marks a run as executing a node until the returned guard drops.
    pub(crate) fn executing(&self, run_id: &str) -> ExecutingGuard<'_> {
        let mut map = self.executing.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(run_id.to_string()).or_insert(0) += 1;
        ExecutingGuard {
            shared: self,
            run_id: run_id.to_string(),
        }
    }
}

/// See [`Shared::executing`].
pub(crate) struct ExecutingGuard<'a> {
    shared: &'a Shared,
    run_id: String,
}

impl Drop for ExecutingGuard<'_> {
    fn drop(&mut self) {
        let mut map = self
            .shared
            .executing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.run_id) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.run_id);
            }
        }
    }
}

/// Builder of the distributed worker ([`RabbitMqAdapter`]).
pub struct RabbitMqAdapterBuilder {
    amqp_url: String,
    pg: PgPool,
    redis: RedisPool,
    blueprints: HashMap<String, Arc<Blueprint>>,
    registry: NodeRegistry,
    queue: String,
    tables: Tables,
    threads: usize,
    prefetch: Option<u16>,
    redis_prefix: String,
    reconcile_every: Option<Duration>,
    stalled_after: Duration,
    max_iterations: u32,
    connection_name: Option<String>,
    public_url: String,
    events_exchange: String,
}

impl RabbitMqAdapterBuilder {
    /// Base URL of webhook endpoints as callers reach them (default `http://127.0.0.1:8080`).
    pub fn public_url(mut self, url: impl Into<String>) -> Self {
        self.public_url = url.into();
        self
    }

    /// The fanout exchange webhook events are published to (default `flowcraft-events`).
    pub fn events_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.events_exchange = exchange.into();
        self
    }

    /// A name reported to RabbitMQ for the worker's connection (client property
    /// `information`), so operators can tell workers apart.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Adds a blueprint.
    pub fn blueprint(self, bp: Blueprint) -> Self {
        self.blueprints([bp])
    }

    /// Adds blueprints.
    pub fn blueprints(mut self, bps: impl IntoIterator<Item = Blueprint>) -> Self {
        crate::blueprint::add_blueprints(&mut self.blueprints, bps);
        self
    }

    /// The node registry (default: the built-ins only).
    pub fn registry(mut self, registry: NodeRegistry) -> Self {
        self.registry = registry;
        self
    }

    /// Job queue name (default `flowcraft-jobs`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Table names (default `flowcraft_contexts`, `flowcraft_statuses`, `flowcraft_webhooks`).
    pub fn tables(mut self, tables: Tables) -> Self {
        self.tables = tables;
        self
    }

    /// Worker threads (default 4).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Unacked deliveries in flight (default 8 × threads). A delivery stays unacked until the
    /// broker confirms the successors it published, a little after its work is done, and
    /// threads hand off their jobs' tails, so a process holds more jobs than threads; with
    /// only 2 × threads the workers starve (measured on `chain5` with 8 threads: 2 964–3 520
    /// jobs/s with 2 × threads, 4 356–6 881 with 8 ×).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch.max(1));
        self
    }

    /// Redis key prefix (default `flowcraft:`).
    pub fn redis_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.redis_prefix = prefix.into();
        self
    }

    /// Reconciler interval (default 30 s; `None` disables the timer thread).
    pub fn reconcile_every(mut self, every: Option<Duration>) -> Self {
        self.reconcile_every = every;
        self
    }

    /// How long a `running` run may be idle before the reconciler resumes it (default 300 s),
    /// and an `awaiting` run before the reconciler sends an overdue wake-up of it again.
    pub fn stalled_after(mut self, after: Duration) -> Self {
        self.stalled_after = after;
        self
    }

    /// How often one node may execute in one run (loops; default 1 000).
    pub fn max_iterations(mut self, n: u32) -> Self {
        self.max_iterations = n.max(1);
        self
    }

    /// Validates the options.
    pub fn build(self) -> Result<RabbitMqAdapter, WorkerError> {
        if self.queue.trim().is_empty() {
            return Err(WorkerError::Options("the queue name is empty".into()));
        }
        amqp::AmqpUrl::parse(&self.amqp_url)?;
        let store = RunStore::new(self.pg, self.tables)?;
        let coord = RedisCoordinationStore::new(self.redis, self.redis_prefix);
        let prefetch = self
            .prefetch
            .unwrap_or_else(|| u16::try_from(self.threads * 8).unwrap_or(u16::MAX));
        Ok(RabbitMqAdapter {
            shared: Arc::new(Shared {
                blueprints: self.blueprints,
                registry: self.registry,
                store,
                coord,
                queue: self.queue,
                max_iterations: self.max_iterations,
                public_url: self.public_url,
                events_exchange: self.events_exchange,
                executing: Mutex::new(HashMap::new()),
            }),
            amqp_url: self.amqp_url,
            threads: self.threads,
            prefetch,
            reconcile_every: self.reconcile_every,
            stalled_after: self.stalled_after,
            connection_name: self.connection_name,
        })
    }
}

/// The distributed worker: consumes jobs and executes them (SPEC §6).
pub struct RabbitMqAdapter {
    shared: Arc<Shared>,
    amqp_url: String,
    threads: usize,
    prefetch: u16,
    reconcile_every: Option<Duration>,
    stalled_after: Duration,
    connection_name: Option<String>,
}

impl RabbitMqAdapter {
    /// A builder from the three services: an AMQP URL, a PostgreSQL pool and a Redis pool.
    pub fn builder(
        amqp_url: impl Into<String>,
        pg: PgPool,
        redis: RedisPool,
    ) -> RabbitMqAdapterBuilder {
        RabbitMqAdapterBuilder {
            amqp_url: amqp_url.into(),
            pg,
            redis,
            blueprints: HashMap::new(),
            registry: NodeRegistry::with_builtins(),
            queue: DEFAULT_QUEUE.into(),
            tables: Tables::default(),
            threads: 4,
            prefetch: None,
            redis_prefix: DEFAULT_PREFIX.into(),
            reconcile_every: Some(Duration::from_secs(30)),
            stalled_after: Duration::from_secs(300),
            max_iterations: DEFAULT_MAX_ITERATIONS,
            connection_name: None,
            public_url: DEFAULT_PUBLIC_URL.into(),
            events_exchange: DEFAULT_EVENTS_EXCHANGE.into(),
        }
    }

    /// A reconciler over the same services and blueprints.
    pub fn reconciler(&self) -> Reconciler {
        Reconciler::new(
            self.shared.store.clone(),
            self.shared.coord.clone(),
            self.shared.blueprints.clone(),
            self.amqp_url.clone(),
            self.shared.queue.clone(),
        )
        .stalled_after(self.stalled_after)
    }

    /// Connects (failing at once if RabbitMQ cannot be reached), then consumes on background
    /// threads until [`WorkerHandle::shutdown`].
    pub fn start(self) -> Result<WorkerHandle, WorkerError> {
        let connection = amqp::connect_named(&self.amqp_url, self.connection_name.as_deref())?;
        let (stop_tx, stop_rx) = unbounded::<()>();
        let reconciler = self.reconcile_every.map(|every| {
            let reconciler = self.reconciler();
            let stop = stop_rx.clone();
            std::thread::Builder::new()
                .name("flowcraft-reconciler".into())
                .spawn(move || reconcile_on_timer(reconciler, every, stop))
        });
        let reconciler = match reconciler {
            Some(Ok(handle)) => Some(handle),
            Some(Err(e)) => {
                return Err(WorkerError::Options(format!(
                    "cannot start the reconciler thread: {e}"
                )))
            }
            None => None,
        };
        // Heartbeat: a run whose node runs long keeps moving `updated_at`, so the reconciler
        // does not take it for stalled.
        let heartbeat = {
            let (shared, stop) = (self.shared.clone(), stop_rx.clone());
            let every =
                (self.stalled_after / 3).clamp(Duration::from_secs(1), Duration::from_secs(60));
            std::thread::Builder::new()
                .name("flowcraft-heartbeat".into())
                .spawn(move || heartbeat(&shared, every, &stop))
                .map_err(|e| {
                    WorkerError::Options(format!("cannot start the heartbeat thread: {e}"))
                })?
        };
        let supervisor = std::thread::Builder::new()
            .name("flowcraft-consumer".into())
            .spawn(move || self.supervise(connection, stop_rx))
            .map_err(|e| WorkerError::Options(format!("cannot start the consumer thread: {e}")))?;
        Ok(WorkerHandle {
            stop: std::sync::Mutex::new(Some(stop_tx)),
            supervisor: Some(supervisor),
            timers: reconciler.into_iter().chain([heartbeat]).collect(),
        })
    }

    /// Runs sessions until asked to stop, reconnecting with backoff after a connection loss.
    fn supervise(self, first: Connection, stop: Receiver<()>) -> Result<(), WorkerError> {
        let mut connection = Some(first);
        let mut backoff = Duration::from_millis(200);
        loop {
            let conn = match connection.take() {
                Some(c) => c,
                None => {
                    match amqp::connect_named(&self.amqp_url, self.connection_name.as_deref()) {
                        Ok(c) => {
                            log::info!("reconnected to RabbitMQ");
                            backoff = Duration::from_millis(200);
                            c
                        }
                        Err(e) => {
                            log::warn!("{e}; retrying in {backoff:?}");
                            if wait_or_stop(&stop, backoff) {
                                return Ok(());
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                            continue;
                        }
                    }
                }
            };
            match self.session(conn, &stop) {
                Ok(SessionEnd::Stopped) => return Ok(()),
                Ok(SessionEnd::ConnectionLost(reason)) => {
                    log::warn!("RabbitMQ connection lost: {reason}; reconnecting")
                }
                Err(e) => log::warn!("RabbitMQ session failed: {e}; reconnecting"),
            }
            if wait_or_stop(&stop, backoff) {
                return Ok(());
            }
        }
    }

    /// One connection's life: consuming channel, one confirm-mode channel per worker thread.
    fn session(
        &self,
        mut connection: Connection,
        stop: &Receiver<()>,
    ) -> Result<SessionEnd, WorkerError> {
        let channel = connection.open_channel(None)?;
        amqp::declare_job_queue(&channel, &self.shared.queue)?;
        amqp::declare_events(&channel, &self.shared.events_exchange, &self.shared.queue)?;
        channel.qos(0, self.prefetch, false)?;
        let mut publishers = Vec::with_capacity(self.threads);
        let mut confirms = Vec::with_capacity(self.threads);
        for _ in 0..self.threads {
            let (publisher, confirm_rx) = AsyncPublisher::new(connection.open_channel(None)?)?;
            publishers.push(publisher);
            confirms.push(confirm_rx);
        }
        let dead_letters = ConfirmPublisher::new(connection.open_channel(None)?)?;
        let consumer =
            channel.basic_consume(self.shared.queue.clone(), ConsumerOptions::default())?;
        let (job_tx, job_rx) = unbounded::<Delivery>();
        let (done_tx, done_rx) = unbounded::<Finished>();
        let closed = Arc::new(AtomicBool::new(false));
        // The session's handed-off job tails (they settle its deliveries).
        let tails = Combiner::new(tail::MAX_TAILS);
        let end = std::thread::scope(|scope| {
            let mut workers = Vec::new();
            for (i, mut publisher) in publishers.into_iter().enumerate() {
                let (jobs, done, shared) = (job_rx.clone(), done_tx.clone(), self.shared.clone());
                let closed = closed.clone();
                let tails = &tails;
                let spawned = std::thread::Builder::new()
                    .name(format!("flowcraft-worker-{i}"))
                    .spawn_scoped(scope, move || {
                        let mut backoff = Backoff::default();
                        for delivery in jobs.iter() {
                            if closed.load(Ordering::SeqCst) {
                                // The session is over: these deliveries return to the queue.
                                continue;
                            }
                            let before = publisher.published();
                            let handled = catch_unwind(AssertUnwindSafe(|| {
                                job::handle(
                                    &shared,
                                    &delivery.body,
                                    delivery.redelivered,
                                    &mut publisher,
                                )
                            }))
                            .unwrap_or_else(|_| {
                                job::Outcome::DeadLetter("handling this message panicked".into())
                                    .into()
                            });
                            let outcome = match handled {
                                job::Handled::Done(outcome) => outcome,
                                job::Handled::Tail(tail) => {
                                    // Its commit, coordination and settling are batched with
                                    // other threads' (see `tail`); this thread goes on.
                                    let mut leader = Leader {
                                        shared: &shared,
                                        publisher: &mut publisher,
                                        index: i,
                                        done: &done,
                                        backoff: &mut backoff,
                                        closed: &closed,
                                        deferred: Vec::new(),
                                    };
                                    tails.hand_off(
                                        PendingTail { delivery, tail },
                                        PendingTail::run_id,
                                        |batch| leader.run(batch),
                                    );
                                    leader.settle_deferred();
                                    continue;
                                }
                            };
                            let retry = match &outcome {
                                job::Outcome::Retry(reason) => Some(reason.as_str()),
                                _ => None,
                            };
                            // A service is failing: back off before the message is requeued.
                            backoff.after(retry, closed.load(Ordering::SeqCst));
                            let after = publisher.published();
                            let finished = Finished {
                                delivery,
                                outcome,
                                publisher: i,
                                tags: (after > before).then_some((before + 1, after)),
                            };
                            if done.send(finished).is_err() {
                                break;
                            }
                        }
                        let _ = publisher.close();
                    });
                match spawned {
                    Ok(handle) => workers.push(handle),
                    Err(e) => log::error!("cannot start worker thread {i}: {e}"),
                }
            }
            drop(job_rx);
            let mut settler = Settler::new(
                &consumer,
                dead_letters,
                amqp::dead_letter_queue(&self.shared.queue),
                self.threads,
                self.prefetch,
            );
            let end = consume(&consumer, &job_tx, &done_rx, &confirms, stop, &mut settler);
            closed.store(true, Ordering::SeqCst);
            drop(job_tx);
            // Workers finish their current job; a lost connection makes their publishes fail
            // fast. Whatever is not acked returns to the queue.
            for w in workers {
                let _ = w.join();
            }
            end
        });
        drop(consumer);
        let _ = channel.close();
        let _ = connection.close();
        Ok(end)
    }
}

enum SessionEnd {
    Stopped,
    ConnectionLost(String),
}

/// A delivery a worker thread is done with, and the delivery tags of the messages it
/// published on its channel (it is acked once the broker confirmed them all).
struct Finished {
    delivery: Delivery,
    outcome: job::Outcome,
    publisher: usize,
    tags: Option<(u64, u64)>,
}

/// Settles deliveries on the consuming channel: at once when they published nothing,
/// otherwise when their publishes are confirmed (and requeued if one was refused).
struct Settler<'c, 'a> {
    consumer: &'c amiquip::Consumer<'a>,
    /// Publishes dead letters to `<queue>.dead` (rare: waits for its confirm).
    dead_letters: ConfirmPublisher,
    dead_queue: String,
    trackers: Vec<ConfirmTracker>,
    waiting: Vec<VecDeque<Finished>>,
    failures: HashMap<Vec<u8>, u32>,
    /// Deliveries not yet acked or nacked: acks are coalesced ([`acks`]).
    book: acks::AckBook<Delivery>,
    /// Set when the session must end (its dead-letter channel failed).
    broken: Option<String>,
}

impl<'c, 'a> Settler<'c, 'a> {
    fn new(
        consumer: &'c amiquip::Consumer<'a>,
        dead_letters: ConfirmPublisher,
        dead_queue: String,
        publishers: usize,
        prefetch: u16,
    ) -> Self {
        Settler {
            consumer,
            dead_letters,
            dead_queue,
            trackers: (0..publishers).map(|_| ConfirmTracker::default()).collect(),
            waiting: (0..publishers).map(|_| VecDeque::new()).collect(),
            failures: HashMap::new(),
            // A slow delivery holds back at most a quarter of the prefetch window (at least
            // one delivery).
            book: acks::AckBook::new(usize::from(prefetch) / 4),
            broken: None,
        }
    }

    /// A delivery goes to the workers.
    fn delivered(&mut self, delivery: &Delivery) {
        self.book.delivered(delivery.delivery_tag());
    }

    /// Acks a delivery (possibly later, with others: see [`acks`]).
    fn ack(&mut self, delivery: Delivery) -> Result<(), amiquip::Error> {
        let tag = delivery.delivery_tag();
        let acks = self.book.ready(tag, delivery);
        self.send_acks(acks)
    }

    /// Nacks a delivery at once, releasing the acks it held back.
    fn nack(&mut self, delivery: Delivery) -> Result<(), amiquip::Error> {
        let acks = self.book.settled_otherwise(delivery.delivery_tag());
        self.consumer.nack(delivery, true)?;
        self.send_acks(acks)
    }

    /// The session ends with deliveries in flight: acks, one by one, the finished ones they
    /// hold back (the channel may still work; if not, they are redelivered, harmlessly).
    fn ack_held(&mut self) {
        for delivery in self.book.take_ready() {
            if self.consumer.ack(delivery).is_err() {
                break;
            }
        }
    }

    fn send_acks(&self, acks: Vec<acks::Ack<Delivery>>) -> Result<(), amiquip::Error> {
        for ack in acks {
            match ack {
                acks::Ack::Single(d) => self.consumer.ack(d)?,
                acks::Ack::Multiple(d) => self.consumer.ack_multiple(d)?,
            }
        }
        Ok(())
    }

    fn finished(&mut self, f: Finished) -> Result<(), amiquip::Error> {
        // Behind an earlier one still waiting on the same channel, it waits too: each is
        // checked for refusals in the order they were sent.
        let waiting = &self.waiting[f.publisher];
        match f.tags {
            Some((_, last))
                if self.trackers[f.publisher].confirmed() < last || !waiting.is_empty() =>
            {
                self.waiting[f.publisher].push_back(f);
                Ok(())
            }
            _ => self.settle(f),
        }
    }

    fn confirm(
        &mut self,
        publisher: usize,
        confirm: amiquip::Confirm,
    ) -> Result<(), amiquip::Error> {
        self.trackers[publisher].record(confirm);
        let confirmed = self.trackers[publisher].confirmed();
        while self.waiting[publisher]
            .front()
            .is_some_and(|f| f.tags.is_some_and(|(_, last)| last <= confirmed))
        {
            if let Some(f) = self.waiting[publisher].pop_front() {
                self.settle(f)?;
            }
        }
        Ok(())
    }

    fn settle(&mut self, f: Finished) -> Result<(), amiquip::Error> {
        let mut outcome = f.outcome;
        if let Some((first, last)) = f.tags {
            if self.trackers[f.publisher].any_nacked(first, last) && outcome == job::Outcome::Ack {
                outcome = job::Outcome::Retry("the broker refused a successor job".into());
            }
        }
        self.settle_outcome(f.delivery, outcome)
    }

    /// Acks, dead-letters or requeues a finished delivery on the consuming channel.
    fn settle_outcome(
        &mut self,
        delivery: Delivery,
        outcome: job::Outcome,
    ) -> Result<(), amiquip::Error> {
        let reason = match outcome {
            job::Outcome::Ack => {
                if !self.failures.is_empty() {
                    self.failures.remove(&delivery.body);
                }
                return self.ack(delivery);
            }
            job::Outcome::Retry(reason) => {
                let count = self.failures.entry(delivery.body.clone()).or_insert(0);
                *count += 1;
                if *count < MAX_DELIVERY_FAILURES {
                    log::warn!("requeueing a message (failure {count}): {reason}");
                    if self.failures.len() > 10_000 {
                        self.failures.clear();
                    }
                    return self.nack(delivery);
                }
                self.failures.remove(&delivery.body);
                format!("failed {MAX_DELIVERY_FAILURES} times: {reason}")
            }
            job::Outcome::DeadLetter(reason) => reason,
        };
        log::warn!("dead-lettering a message to {}: {reason}", self.dead_queue);
        let properties = amqp::dead_letter_properties(&reason);
        match self.dead_letters.publish(
            "",
            &self.dead_queue,
            std::slice::from_ref(&delivery.body),
            &properties,
        ) {
            Ok(()) => self.ack(delivery),
            Err(e) => {
                // Nothing is dropped: the message goes back to the queue, and the session
                // ends so that the channels are rebuilt.
                log::error!("cannot dead-letter a message ({e}); requeueing it");
                self.broken = Some(format!("the dead-letter channel failed: {e}"));
                self.nack(delivery)
            }
        }
    }
}

/// The consumer thread's loop: hand deliveries to the workers, settle finished ones as their
/// publishes are confirmed, and on a stop request cancel the consumer and drain until every
/// delivery in flight is settled.
fn consume(
    consumer: &amiquip::Consumer<'_>,
    jobs: &Sender<Delivery>,
    done: &Receiver<Finished>,
    confirms: &[Receiver<amiquip::Confirm>],
    stop: &Receiver<()>,
    settler: &mut Settler<'_, '_>,
) -> SessionEnd {
    let mut select = Select::new();
    let deliveries_op = select.recv(consumer.receiver());
    let done_op = select.recv(done);
    let confirm_ops: Vec<usize> = confirms.iter().map(|c| select.recv(c)).collect();
    let mut stop_op = Some(select.recv(stop));
    let mut cancelled = false;
    loop {
        if stop_op.is_none() && cancelled && settler.book.in_flight() == 0 {
            return SessionEnd::Stopped;
        }
        if let Some(reason) = settler.broken.take() {
            settler.ack_held();
            return SessionEnd::ConnectionLost(reason);
        }
        let op = select.select();
        let index = op.index();
        if index == deliveries_op {
            match op.recv(consumer.receiver()) {
                Ok(ConsumerMessage::Delivery(delivery)) => {
                    settler.delivered(&delivery);
                    if jobs.send(delivery).is_err() {
                        settler.ack_held();
                        return SessionEnd::ConnectionLost("worker threads are gone".into());
                    }
                }
                Ok(ConsumerMessage::ClientCancelled) => {
                    // No more deliveries; the receiver closes, so stop selecting on it.
                    cancelled = true;
                    select.remove(deliveries_op);
                }
                Ok(ConsumerMessage::ServerClosedChannel(e))
                | Ok(ConsumerMessage::ServerClosedConnection(e)) => {
                    return SessionEnd::ConnectionLost(e.to_string());
                }
                Ok(other) => {
                    return SessionEnd::ConnectionLost(format!("consumer ended: {other:?}"))
                }
                Err(_) => {
                    return SessionEnd::ConnectionLost("the consumer's channel closed".into())
                }
            }
        } else if index == done_op {
            let Ok(finished) = op.recv(done) else {
                settler.ack_held();
                return SessionEnd::ConnectionLost("worker threads are gone".into());
            };
            if let Err(e) = settler.finished(finished) {
                return SessionEnd::ConnectionLost(e.to_string());
            }
        } else if Some(index) == stop_op {
            let _ = op.recv(stop);
            log::info!(
                "stopping: no new jobs; finishing {} in flight",
                settler.book.in_flight()
            );
            select.remove(index);
            stop_op = None;
            if consumer.cancel().is_err() {
                return SessionEnd::Stopped;
            }
        } else if let Some(publisher) = confirm_ops.iter().position(|&o| o == index) {
            match op.recv(&confirms[publisher]) {
                Ok(confirm) => {
                    if let Err(e) = settler.confirm(publisher, confirm) {
                        return SessionEnd::ConnectionLost(e.to_string());
                    }
                }
                Err(_) => return SessionEnd::ConnectionLost("a publishing channel closed".into()),
            }
        }
    }
}

/// A worker thread's pause after a service failed, growing while failures go on, so a
/// message is not requeued and retried in a tight loop during an outage.
#[derive(Default)]
struct Backoff {
    failing: u32,
}

impl Backoff {
    /// After handling a delivery (or a batch of them): if one is to be retried (`retry`, its
    /// reason), waits 100 ms, 200 ms, … up to 5 s while failures go on — unless the session
    /// is over (`closed`): its deliveries return to the queue anyway. After a success, the
    /// next failure waits the least again.
    fn after(&mut self, retry: Option<&str>, closed: bool) {
        match retry {
            Some(reason) if !closed => {
                self.failing = (self.failing + 1).min(7);
                let pause = Duration::from_millis(50 << self.failing).min(Duration::from_secs(5));
                log::warn!("{reason}; retrying in {pause:?}");
                std::thread::sleep(pause);
            }
            Some(_) => {}
            None => self.failing = 0,
        }
    }
}

/// Waits for `timeout` unless a stop request comes first; returns whether to stop.
fn wait_or_stop(stop: &Receiver<()>, timeout: Duration) -> bool {
    !matches!(
        stop.recv_timeout(timeout),
        Err(crossbeam_channel::RecvTimeoutError::Timeout)
    )
}

fn heartbeat(shared: &Shared, every: Duration, stop: &Receiver<()>) {
    while !wait_or_stop(stop, every) {
        let runs: Vec<String> = {
            let map = shared.executing.lock().unwrap_or_else(|p| p.into_inner());
            map.keys().cloned().collect()
        };
        if let Err(e) = shared.store.touch_many(&runs) {
            log::warn!("heartbeat failed: {e}");
        }
    }
}

fn reconcile_on_timer(reconciler: Reconciler, every: Duration, stop: Receiver<()>) {
    while !wait_or_stop(&stop, every) {
        match reconciler.run() {
            Ok(stats) if stats.stalled_runs > 0 || stats.woken_runs > 0 => log::info!(
                "reconciler: {} stalled, {} reconciled, {} awaiting runs woken, {} failed",
                stats.stalled_runs,
                stats.reconciled_runs,
                stats.woken_runs,
                stats.failed_runs
            ),
            Ok(_) => {}
            Err(e) => log::warn!("reconciler pass failed: {e}"),
        }
    }
}

/// A running worker.
pub struct WorkerHandle {
    /// Dropping the sender is the stop signal: every listener sees the channel disconnect.
    stop: std::sync::Mutex<Option<Sender<()>>>,
    supervisor: Option<JoinHandle<Result<(), WorkerError>>>,
    /// The reconciler and heartbeat threads.
    timers: Vec<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Stops consuming; in-flight jobs finish and are acked; then the connection closes.
    /// Returns at once: [`join`](WorkerHandle::join) waits.
    pub fn shutdown(&self) {
        if let Ok(mut stop) = self.stop.lock() {
            stop.take();
        }
    }

    /// Waits for the worker to end (after [`shutdown`](WorkerHandle::shutdown)).
    pub fn join(mut self) -> Result<(), WorkerError> {
        for t in self.timers.drain(..) {
            let _ = t.join();
        }
        match self.supervisor.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(WorkerError::Panicked),
            None => Ok(()),
        }
    }

    /// Stops and waits.
    pub fn stop(self) -> Result<(), WorkerError> {
        self.shutdown();
        self.join()
    }
}
