//! The supervisor: the consumer thread's outer loop. It runs one *session* per RabbitMQ
//! connection — the consuming channel, one confirm-mode channel and one [`WorkerThread`]
//! per thread, and the consumer loop ([`consume`]) — and when the connection is lost,
//! reconnects with backoff (200 ms doubling to 10 s) and starts a new session. Deliveries
//! unacked when a session ends return to the queue.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amiquip::{Connection, ConsumerOptions, Delivery};
use crossbeam_channel::{unbounded, Receiver};

use crate::runtime::error::Result;
use crate::services::group::Combiner;
use crate::services::rabbitmq::{self as amqp, AsyncPublisher, ConfirmPublisher, ConfirmTracker};

use super::backoff::Backoff;
use super::consumer::{consume, Finished, SessionEnd, Settler};
use super::shared::Shared;
use super::tail;
use super::thread::WorkerThread;
use super::timers::wait_or_stop;

/// The consumer thread's outer loop: sessions, one per connection, until a stop is asked
/// for.
pub(super) struct Supervisor {
    pub(super) shared: Arc<Shared>,
    pub(super) amqp_url: String,
    /// Reported to RabbitMQ as the connection's name.
    pub(super) connection_name: Option<String>,
    pub(super) threads: usize,
    pub(super) prefetch: u16,
}

impl Supervisor {
    /// Runs sessions until asked to stop, reconnecting with backoff after a connection loss.
    pub(super) fn run(self, first: Connection, stop: Receiver<()>) -> Result<()> {
        let mut connection = Some(first);
        let mut backoff = Duration::from_millis(200);
        loop {
            let conn = match connection.take() {
                Some(c) => c,
                None => {
                    match amqp::connect_named(&self.amqp_url, self.connection_name.as_deref()) {
                        Ok(c) => {
                            log::info!("reconnected to RabbitMQ");
                            self.shared.metrics.reconnects.inc();
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

    /// One connection's life: a consuming channel, one confirm-mode channel per worker
    /// thread, the worker threads, and the consumer thread's loop until the connection is
    /// lost or a stop is asked for.
    fn session(&self, mut connection: Connection, stop: &Receiver<()>) -> Result<SessionEnd> {
        let channel = connection.open_channel(None)?;
        amqp::declare_job_queue(&channel, &self.shared.queue)?;
        amqp::declare_events(&channel, &self.shared.events_exchange, &self.shared.queue)?;
        channel.qos(0, self.prefetch, false)?;
        let mut publishers = Vec::with_capacity(self.threads);
        let mut confirms = Vec::with_capacity(self.threads);
        // The consumer thread follows each publisher's confirms; each publisher paces
        // itself by them.
        let trackers: Vec<ConfirmTracker> = (0..self.threads)
            .map(|_| ConfirmTracker::default())
            .collect();
        for tracker in &trackers {
            let (mut publisher, confirm_rx) = AsyncPublisher::new(connection.open_channel(None)?)?;
            publisher.pace_with(tracker.watermark());
            publishers.push(publisher);
            confirms.push(confirm_rx);
        }
        let dead_letters = ConfirmPublisher::new(connection.open_channel(None)?)?;
        let consumer =
            channel.basic_consume(self.shared.queue.clone(), ConsumerOptions::default())?;
        let (job_tx, job_rx) = unbounded::<Delivery>();
        let (done_tx, done_rx) = unbounded::<Finished>();
        let closed = AtomicBool::new(false);
        // The session's handed-off job tails (they settle its deliveries).
        let tails = Combiner::new(tail::MAX_TAILS);
        let end = std::thread::scope(|scope| {
            let mut workers = Vec::new();
            for (index, publisher) in publishers.into_iter().enumerate() {
                let worker = WorkerThread {
                    index,
                    shared: &self.shared,
                    publisher,
                    jobs: job_rx.clone(),
                    done: done_tx.clone(),
                    closed: &closed,
                    tails: &tails,
                    backoff: Backoff::default(),
                };
                let spawned = std::thread::Builder::new()
                    .name(format!("flowcraft-worker-{index}"))
                    .spawn_scoped(scope, move || worker.run());
                match spawned {
                    Ok(handle) => workers.push(handle),
                    Err(e) => log::error!("cannot start worker thread {index}: {e}"),
                }
            }
            drop(job_rx);
            let mut settler = Settler::new(
                &consumer,
                dead_letters,
                amqp::dead_letter_queue(&self.shared.queue),
                trackers,
                self.prefetch,
                self.shared.metrics.clone(),
            );
            self.shared.metrics.consuming.store(true, Ordering::SeqCst);
            let end = consume(&consumer, &job_tx, &done_rx, &confirms, stop, &mut settler);
            self.shared.metrics.consuming.store(false, Ordering::SeqCst);
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
