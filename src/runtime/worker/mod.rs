//! The distributed worker: one consumer thread, a fixed pool of worker threads, and a
//! reconciler and a heartbeat on timer threads.
//!
//! ```text
//!             deliveries (bounded by prefetch)            publish successors (confirms)
//!  RabbitMQ ──► consumer thread ──crossbeam──► worker threads ──► PostgreSQL / Redis / RabbitMQ
//!                   ▲                               │
//!                   └──── done: ack / reject ───────┘   (acks go out on the consuming channel)
//! ```
//!
//! A delivery is acked only after its effects are committed and its successor jobs are
//! confirmed by the broker. Where to read what:
//!
//! | file | what |
//! | --- | --- |
//! | [`job`] | **the per-job protocol**, top to bottom, with its crash windows |
//! | [`thread`] | a worker thread's loop ([`WorkerThread`](thread::WorkerThread)) |
//! | [`tail`] | commit → coordinate → publish → complete, batched across threads |
//! | [`consumer`] | the consumer thread's loop and the [`Settler`](consumer::Settler): ack after confirms |
//! | [`acks`] | coalesced acknowledgements |
//! | [`pause`] | `wait`, `sleep`, `webhook`, `subflow`: pausing and waking nodes |
//! | [`supervisor`] | one connection's life (a session), reconnecting with backoff |
//! | [`builder`] | [`RabbitMqAdapterBuilder`] and its defaults |
//! | [`backoff`] | a worker thread's pause while a service fails |
//! | [`timers`] | the heartbeat and reconciler threads |
//!
//! When the connection is lost the session ends — unacked deliveries go back to the queue —
//! and the worker reconnects with backoff. [`WorkerHandle::shutdown`] stops consuming, lets
//! in-flight jobs finish and be acked, then closes cleanly.

mod acks;
mod backoff;
mod builder;
mod consumer;
mod job;
mod pause;
mod supervisor;
mod tail;
mod thread;
mod timers;

pub use builder::RabbitMqAdapterBuilder;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{unbounded, Sender};

use crate::engine::blueprint::Blueprint;
use crate::engine::node::NodeRegistry;
use crate::runtime::error::{Error, Result};
use crate::runtime::reconciler::Reconciler;
use crate::services::postgres::store::RunStore;
use crate::services::rabbitmq as amqp;
use crate::services::redis::RedisCoordinationStore;

/// Default job queue.
pub const DEFAULT_QUEUE: &str = "flowcraft-jobs";
/// Default fanout exchange of webhook events.
pub const DEFAULT_EVENTS_EXCHANGE: &str = "flowcraft-events";
/// Default base of webhook URLs.
pub const DEFAULT_PUBLIC_URL: &str = "http://127.0.0.1:8080";

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
    pub fn start(self) -> Result<WorkerHandle, Error> {
        let connection = amqp::connect_named(&self.amqp_url, self.connection_name.as_deref())?;
        let (stop_tx, stop_rx) = unbounded::<()>();
        let reconciler = match self.reconcile_every {
            Some(every) => Some(timers::start_reconciler(
                self.reconciler(),
                every,
                stop_rx.clone(),
            )?),
            None => None,
        };
        let heartbeat =
            timers::start_heartbeat(self.shared.clone(), self.stalled_after, stop_rx.clone())?;
        let supervisor = std::thread::Builder::new()
            .name("flowcraft-consumer".into())
            .spawn(move || self.supervise(connection, stop_rx))
            .map_err(Error::thread("consumer"))?;
        Ok(WorkerHandle {
            stop: std::sync::Mutex::new(Some(stop_tx)),
            supervisor: Some(supervisor),
            timers: reconciler.into_iter().chain([heartbeat]).collect(),
        })
    }
}

/// A running worker.
pub struct WorkerHandle {
    /// Dropping the sender is the stop signal: every listener sees the channel disconnect.
    stop: std::sync::Mutex<Option<Sender<()>>>,
    supervisor: Option<JoinHandle<Result<()>>>,
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
    pub fn join(mut self) -> Result<()> {
        for t in self.timers.drain(..) {
            let _ = t.join();
        }
        match self.supervisor.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(Error::Panicked),
            None => Ok(()),
        }
    }

    /// Stops and waits.
    pub fn stop(self) -> Result<()> {
        self.shutdown();
        self.join()
    }
}
