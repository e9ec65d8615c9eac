//! [`RabbitMqAdapter`], the distributed worker, and [`WorkerHandle`], a running one.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{unbounded, Sender};

use crate::runtime::error::{Error, Result};
use crate::runtime::metrics;
use crate::runtime::reconciler::Reconciler;
use crate::services::http::HttpServer;
use crate::services::rabbitmq as amqp;

use super::shared::Shared;
use super::supervisor::Supervisor;
use super::timers;

/// The distributed worker: consumes jobs and executes them (SPEC §6).
pub struct RabbitMqAdapter {
    pub(super) shared: Arc<Shared>,
    pub(super) amqp_url: String,
    pub(super) threads: usize,
    pub(super) prefetch: u16,
    pub(super) reconcile_every: Option<Duration>,
    pub(super) stalled_after: Duration,
    pub(super) connection_name: Option<String>,
    pub(super) metrics_listen: Option<String>,
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
        .observed(
            self.shared.metrics.clone(),
            self.shared.registry.events().clone(),
        )
    }

    /// Connects (failing at once if RabbitMQ cannot be reached), then consumes on background
    /// threads until [`WorkerHandle::shutdown`].
    pub fn start(self) -> Result<WorkerHandle, Error> {
        let connection = amqp::connect_named(&self.amqp_url, self.connection_name.as_deref())?;
        let metrics = match &self.metrics_listen {
            Some(addr) => Some(metrics::serve(
                addr,
                self.shared.metrics.clone(),
                self.shared.store.clone(),
                self.shared.coord.clone(),
            )?),
            None => None,
        };
        let (stop_tx, stop_rx) = unbounded::<()>();
        let reconciler = match self.reconcile_every {
            Some(every) => Some(timers::start_reconciler(
                self.reconciler(),
                every,
                self.shared.metrics.clone(),
                stop_rx.clone(),
            )?),
            None => None,
        };
        let heartbeat =
            timers::start_heartbeat(self.shared.clone(), self.stalled_after, stop_rx.clone())?;
        let cancel_watcher = timers::start_cancel_watcher(self.shared.clone(), stop_rx.clone())?;
        let supervisor = Supervisor {
            shared: self.shared.clone(),
            amqp_url: self.amqp_url.clone(),
            connection_name: self.connection_name.clone(),
            threads: self.threads,
            prefetch: self.prefetch,
        };
        let supervisor = std::thread::Builder::new()
            .name("flowcraft-consumer".into())
            .spawn(move || supervisor.run(connection, stop_rx))
            .map_err(Error::thread("consumer"))?;
        Ok(WorkerHandle {
            stop: std::sync::Mutex::new(Some(stop_tx)),
            supervisor: Some(supervisor),
            timers: reconciler
                .into_iter()
                .chain([heartbeat, cancel_watcher])
                .collect(),
            metrics,
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
    /// The metrics and health endpoints, when served.
    metrics: Option<HttpServer>,
}

impl WorkerHandle {
    /// Stops consuming; in-flight jobs finish and are acked; then the connection closes.
    /// Returns at once: [`join`](WorkerHandle::join) waits.
    pub fn shutdown(&self) {
        if let Ok(mut stop) = self.stop.lock() {
            stop.take();
        }
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, if they are.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(HttpServer::local_addr)
    }

    /// Waits for the worker to end (after [`shutdown`](WorkerHandle::shutdown)).
    pub fn join(mut self) -> Result<()> {
        if let Some(server) = self.metrics.take() {
            server.stop();
        }
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
