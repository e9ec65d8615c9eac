//! The consumer thread: it hands deliveries to the worker threads and settles each finished
//! one on the consuming channel — at once when it published nothing, otherwise once the
//! broker confirmed its publishes ([`Settler`]); acks are coalesced ([`acks`](super::acks)).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use amiquip::{ConsumerMessage, Delivery};
use crossbeam_channel::{Receiver, Select, Sender};

use crate::runtime::metrics::Metrics;
use crate::services::rabbitmq::{self as amqp, ConfirmPublisher, ConfirmTracker, JobSink};

use super::acks;

/// What the consumer thread does with a finished delivery.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Outcome {
    Ack,
    /// Reject without requeue: the broker routes it to `<queue>.dead`.
    DeadLetter(String),
    /// A service failed; requeue (dead-lettered after repeated failures).
    Retry(String),
}

/// A digest of a message body, to count its failures without keeping the body.
fn digest(body: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    hasher.finish()
}

/// How a session ended.
pub(super) enum SessionEnd {
    /// A stop was asked for, and every delivery in flight is settled.
    Stopped,
    /// The connection (or a channel the session needs) is gone, for this reason.
    ConnectionLost(String),
}

/// How often a delivery may fail on a service error before it is dead-lettered (with the
/// workers' backoff, about a minute and a half of outage).
const MAX_DELIVERY_FAILURES: u32 = 20;

/// A delivery a worker thread is done with, and the delivery tags of the messages it
/// published on its channel (it is acked once the broker confirmed them all).
pub(super) struct Finished {
    pub(super) delivery: Delivery,
    pub(super) outcome: Outcome,
    pub(super) publisher: usize,
    pub(super) tags: Option<(u64, u64)>,
}

/// Settles deliveries on the consuming channel: at once when they published nothing,
/// otherwise when their publishes are confirmed (and requeued if one was refused).
pub(super) struct Settler<'c, 'a> {
    /// What the worker counts: settled deliveries by outcome, deliveries in flight.
    metrics: Arc<Metrics>,
    consumer: &'c amiquip::Consumer<'a>,
    /// Publishes dead letters to `<queue>.dead` (rare: waits for its confirm).
    dead_letters: ConfirmPublisher,
    dead_queue: String,
    trackers: Vec<ConfirmTracker>,
    waiting: Vec<VecDeque<Finished>>,
    /// Failures so far of each message being retried, by a digest of its body.
    failures: HashMap<u64, u32>,
    /// Deliveries not yet acked or nacked: acks are coalesced ([`acks`]).
    book: acks::AckBook<Delivery>,
    /// Set when the session must end (its dead-letter channel failed).
    broken: Option<String>,
    /// When each delivery in flight arrived, by delivery tag.
    arrived: HashMap<u64, std::time::Instant>,
}

impl<'c, 'a> Settler<'c, 'a> {
    pub(super) fn new(
        consumer: &'c amiquip::Consumer<'a>,
        dead_letters: ConfirmPublisher,
        dead_queue: String,
        trackers: Vec<ConfirmTracker>,
        prefetch: u16,
        metrics: Arc<Metrics>,
    ) -> Self {
        let publishers = trackers.len();
        Settler {
            metrics,
            consumer,
            dead_letters,
            dead_queue,
            trackers,
            waiting: (0..publishers).map(|_| VecDeque::new()).collect(),
            failures: HashMap::new(),
            // A slow delivery holds back at most a quarter of the prefetch window (at least
            // one delivery).
            book: acks::AckBook::new(usize::from(prefetch) / 4),
            broken: None,
            arrived: HashMap::new(),
        }
    }

    /// A delivery goes to the workers.
    fn delivered(&mut self, delivery: &Delivery) {
        self.book.delivered(delivery.delivery_tag());
        self.arrived
            .insert(delivery.delivery_tag(), std::time::Instant::now());
        self.metrics.in_flight.set(self.book.in_flight() as i64);
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
            if self.trackers[f.publisher].any_nacked(first, last) && outcome == Outcome::Ack {
                outcome = Outcome::Retry("the broker refused a successor job".into());
            }
        }
        self.settle_outcome(f.delivery, outcome)
    }

    /// Acks, dead-letters or requeues a finished delivery on the consuming channel.
    fn settle_outcome(
        &mut self,
        delivery: Delivery,
        outcome: Outcome,
    ) -> Result<(), amiquip::Error> {
        let label = match &outcome {
            Outcome::Ack => "ack",
            Outcome::Retry(_) => "retry",
            Outcome::DeadLetter(_) => "dead_letter",
        };
        self.metrics.jobs.with_label_values(&[label]).inc();
        if let Some(arrived) = self.arrived.remove(&delivery.delivery_tag()) {
            self.metrics
                .job_seconds
                .observe(arrived.elapsed().as_secs_f64());
        }
        let settled = self.settle_counted(delivery, outcome);
        self.metrics.in_flight.set(self.book.in_flight() as i64);
        settled
    }

    fn settle_counted(
        &mut self,
        delivery: Delivery,
        outcome: Outcome,
    ) -> Result<(), amiquip::Error> {
        let reason = match outcome {
            Outcome::Ack => {
                if !self.failures.is_empty() {
                    self.failures.remove(&digest(&delivery.body));
                }
                return self.ack(delivery);
            }
            Outcome::Retry(reason) => {
                let count = self.failures.entry(digest(&delivery.body)).or_insert(0);
                *count += 1;
                if *count < MAX_DELIVERY_FAILURES {
                    log::warn!("requeueing a message (failure {count}): {reason}");
                    if self.failures.len() > 10_000 {
                        self.failures.clear();
                    }
                    return self.nack(delivery);
                }
                self.failures.remove(&digest(&delivery.body));
                format!("failed {MAX_DELIVERY_FAILURES} times: {reason}")
            }
            Outcome::DeadLetter(reason) => reason,
        };
        log::warn!("dead-lettering a message to {}: {reason}", self.dead_queue);
        let properties = amqp::dead_letter_properties(&delivery.properties, &reason);
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
pub(super) fn consume(
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
