//! [`WorkerThread`]: one worker thread of a session and its loop.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use amiquip::Delivery;
use crossbeam_channel::{Receiver, Sender};

use crate::services::group::Combiner;
use crate::services::rabbitmq::AsyncPublisher;

use super::backoff::Backoff;
use super::consumer::Finished;
use super::consumer::Outcome;
use super::job::{self, Handled};
use super::shared::Shared;
use super::tail::{Leader, PendingTail};

/// A worker thread: takes deliveries from the consumer thread, runs the per-job protocol
/// ([`job::handle`]) on each, and either hands the job's tail off to be batched
/// ([`tail`](super::tail)) or reports the delivery finished to the consumer thread, which
/// settles it.
pub(super) struct WorkerThread<'s> {
    /// Its index among the session's threads (and publishers).
    pub(super) index: usize,
    pub(super) shared: &'s Shared,
    /// Its own confirm-mode channel: it publishes successors there.
    pub(super) publisher: AsyncPublisher,
    pub(super) jobs: Receiver<Delivery>,
    pub(super) done: Sender<Finished>,
    /// Set when the session is over.
    pub(super) closed: &'s AtomicBool,
    /// The session's handed-off job tails.
    pub(super) tails: &'s Combiner<PendingTail>,
    pub(super) backoff: Backoff,
}

impl WorkerThread<'_> {
    /// Handles deliveries until the session ends.
    pub(super) fn run(mut self) {
        while let Ok(delivery) = self.jobs.recv() {
            if self.closed.load(Ordering::SeqCst) {
                // The session is over: these deliveries return to the queue.
                continue;
            }
            if !self.run_one(delivery) {
                break;
            }
        }
        let _ = self.publisher.close();
    }

    /// One delivery; returns whether the consumer thread is still there.
    fn run_one(&mut self, delivery: Delivery) -> bool {
        let before = self.publisher.published();
        let handled = catch_unwind(AssertUnwindSafe(|| {
            job::handle(
                self.shared,
                &delivery.body,
                delivery.redelivered,
                &mut self.publisher,
            )
        }))
        .unwrap_or_else(|_| Outcome::DeadLetter("handling this message panicked".into()).into());
        match handled {
            Handled::Tail(tail) => {
                self.hand_off(PendingTail::new(delivery, tail));
                true
            }
            Handled::Done(outcome) => self.finish(delivery, outcome, before),
        }
    }

    /// Queues a job's tail to be run in a batch with other threads' (see
    /// [`tail`](super::tail)); if no other thread leads, this one runs the queue, then goes
    /// on with its next delivery.
    fn hand_off(&mut self, pending: PendingTail) {
        let mut leader = Leader {
            shared: self.shared,
            publisher: &mut self.publisher,
            index: self.index,
            done: &self.done,
            backoff: &mut self.backoff,
            closed: self.closed,
            deferred: Vec::new(),
            waiting: &self.jobs,
            tails: self.tails,
        };
        self.tails
            .hand_off(pending, PendingTail::execution, |batch| leader.run(batch));
        leader.settle_deferred();
    }

    /// Reports a delivery settled by the protocol itself (nothing to commit, or its node
    /// failed or paused) to the consumer thread, with the tags of what it published since
    /// `before`; returns whether the consumer thread is still there.
    fn finish(&mut self, delivery: Delivery, outcome: Outcome, before: u64) -> bool {
        let retry = match &outcome {
            Outcome::Retry(reason) => Some(reason.as_str()),
            _ => None,
        };
        // A service is failing: back off before the message is requeued.
        self.backoff
            .after(retry, self.closed.load(Ordering::SeqCst));
        let after = self.publisher.published();
        let finished = Finished {
            delivery,
            outcome,
            publisher: self.index,
            tags: (after > before).then_some((before + 1, after)),
        };
        self.done.send(finished).is_ok()
    }
}
