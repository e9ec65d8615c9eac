//! The tail of a job whose node executed — commit → coordinate → publish → ack, in that
//! order (see [`job`](super::job) for its crash windows) — run for a batch of jobs at once.
//!
//! A worker thread does not wait for its job's tail: it hands the tail off
//! ([`Combiner`](crate::group::Combiner)) and takes its next delivery. Whichever thread finds
//! nobody leading runs the queued tails in batches: one commit statement for the batch, one
//! Redis pipeline for the commits that applied, then each job's publishes (on the leading
//! thread's channel) and final status, and hands each delivery to the consumer thread to be
//! acked once its publishes are confirmed. So a process keeps more jobs in flight than it
//! has threads, and its statements and pipelines carry more jobs each. A lone thread leads
//! its own tail at once: with one thread, nothing changes.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use amiquip::Delivery;
use crossbeam_channel::Sender;

use crate::amqp::AsyncPublisher;
use crate::coordination::{job_id, SuccessorReport};
use crate::failpoint;
use crate::node::ContextMap;
use crate::protocol::JobPayload;
use crate::resume::RunProgress;
use crate::store::{CommitGuard, NodeCommit, StoreError};

use super::job::{describe, Outcome};
use super::{pause, Finished, Shared, WorkerError};

/// Most job tails one batch carries.
pub(super) const MAX_TAILS: usize = 64;

/// What is left of a job once its node executed.
pub(crate) struct TailJob {
    pub(crate) job: JobPayload,
    /// The node's id in the blueprint (what the failpoints name).
    pub(crate) node_id: String,
    pub(crate) commit: NodeCommit,
    pub(crate) guard: CommitGuard,
    /// The run's start jobs, registered in the ledger with this one when it is one of them.
    pub(crate) also_register: Vec<String>,
    /// The successors chosen, reported to their joins.
    pub(crate) successors: Vec<SuccessorReport>,
}

/// A tail waiting to be run, with the delivery it settles.
pub(super) struct PendingTail {
    pub(super) delivery: Delivery,
    pub(super) tail: Box<TailJob>,
}

impl PendingTail {
    /// Tails of one run never share a batch (one statement cannot commit a row twice).
    pub(super) fn run_id(&self) -> Option<&str> {
        Some(&self.tail.job.run_id)
    }
}

/// The thread that runs a batch of tails: its channel, and where settled deliveries go.
pub(super) struct Leader<'a> {
    pub(super) shared: &'a Shared,
    pub(super) publisher: &'a mut AsyncPublisher,
    /// The index of `publisher` among the session's publishers.
    pub(super) index: usize,
    pub(super) done: &'a Sender<Finished>,
    pub(super) backoff: &'a mut Backoff,
    /// Whether the session is over (failures then wait for nothing).
    pub(super) closed: &'a AtomicBool,
}

impl Leader<'_> {
    /// Runs a batch of tails and hands each delivery on to be settled. A panic fails (and
    /// dead-letters) the deliveries not yet handed on, as it would a job's.
    pub(super) fn run(&mut self, batch: Vec<PendingTail>) {
        let mut pending: Vec<Option<PendingTail>> = batch.into_iter().map(Some).collect();
        let outcome = catch_unwind(AssertUnwindSafe(|| self.run_batch(&mut pending)));
        if outcome.is_err() {
            for p in pending.iter_mut().filter_map(Option::take) {
                let panicked = Outcome::DeadLetter("handling this message panicked".into());
                self.settle(p.delivery, panicked, None);
            }
        }
    }

    fn run_batch(&mut self, pending: &mut [Option<PendingTail>]) {
        let shared = self.shared;
        // Commit.
        let commits = pending
            .iter_mut()
            .flatten()
            .map(|p| {
                let t = &mut p.tail;
                let guard = t.guard.clone();
                (t.job.run_id.clone(), std::mem::take(&mut t.commit), guard)
            })
            .collect();
        let applied = shared.store.commit_nodes(commits);
        let mut coordinating = Vec::new();
        let mut retrying: Option<String> = None;
        for (slot, applied) in pending.iter_mut().zip(applied) {
            let Some(p) = slot else { continue };
            match applied {
                Ok(true) => {
                    failpoint::hit("after_commit", &p.tail.node_id);
                    coordinating.push(slot);
                }
                Ok(false) => {
                    log::debug!(
                        "run {}: node '{}' was committed by another delivery",
                        p.tail.job.run_id,
                        p.tail.node_id
                    );
                    let p = slot.take().expect("the slot was just matched");
                    self.settle(p.delivery, Outcome::Ack, None);
                }
                Err(e) => {
                    let p = slot.take().expect("the slot was just matched");
                    let reason = format!("{}: {e}", describe(&p.tail.job));
                    retrying.get_or_insert_with(|| reason.clone());
                    self.settle(p.delivery, Outcome::Retry(reason), None);
                }
            }
        }
        // Coordinate: one Redis pipeline for the batch.
        let calls = coordinating
            .iter()
            .flat_map(|slot| slot.as_ref())
            .map(|p| {
                let t = &p.tail;
                let me = job_id(&t.job.node_id, t.job.iteration);
                let run = t.job.run_id.clone();
                (run, me, t.also_register.clone(), t.successors.clone())
            })
            .collect();
        let finished = shared.coord.finish_jobs(calls);
        // Publish: each job's ready successors.
        let resumer = pause::resumer(shared);
        let mut published = Vec::new();
        for (slot, finished) in coordinating.into_iter().zip(finished) {
            let Some(p) = slot.take() else { continue };
            let first_tag = self.publisher.published() + 1;
            let t = &p.tail;
            let progress = finished.map_err(WorkerError::from).and_then(|outcome| {
                let Some(bp) = shared.blueprints.get(&t.job.blueprint_id) else {
                    // (Unreachable: checked before the node ran, and a worker's blueprints
                    // do not change. The run then waits for the reconciler.)
                    log::error!(
                        "run {}: blueprint '{}' vanished",
                        t.job.run_id,
                        t.job.blueprint_id
                    );
                    return Ok(RunProgress::Busy);
                };
                let progress = resumer.publish_ready(
                    &t.job.run_id,
                    bp,
                    &t.successors,
                    &outcome,
                    self.publisher,
                )?;
                failpoint::hit("after_publish", &t.job.node_id);
                Ok(progress)
            });
            published.push((p, first_tag, progress));
        }
        // Final status: the runs now idle complete in one statement.
        let idle: Vec<String> = published
            .iter()
            .filter(|(_, _, progress)| matches!(progress, Ok(RunProgress::Idle)))
            .map(|(p, _, _)| p.tail.job.run_id.clone())
            .collect();
        let mut completed: HashMap<String, Result<Option<ContextMap>, StoreError>> = idle
            .iter()
            .cloned()
            .zip(shared.store.complete_runs(&idle))
            .collect();
        for (p, first_tag, progress) in published {
            let run_id = &p.tail.job.run_id;
            let result = progress.and_then(|progress| match progress {
                RunProgress::Busy => Ok(()),
                RunProgress::Idle => match completed.remove(run_id) {
                    Some(Ok(Some(context))) => resumer.completed(run_id, &context, self.publisher),
                    Some(Ok(None)) => Ok(()),
                    Some(Err(e)) => Err(e.into()),
                    None => Err(StoreError::Grouped("no completion for this run".into()).into()),
                },
                RunProgress::IdleUnverified => resumer
                    .complete_if_idle(run_id, progress, self.publisher)
                    .map(|_| ()),
            });
            let outcome = match result {
                Ok(()) => Outcome::Ack,
                Err(e) => {
                    let reason = format!("{}: {e}", describe(&p.tail.job));
                    retrying.get_or_insert_with(|| reason.clone());
                    Outcome::Retry(reason)
                }
            };
            // Its publishes are numbered `first_tag..=last`; other jobs' may lie between
            // (they are acked only once all up to `last` are confirmed).
            let last = self.publisher.published();
            self.settle(
                p.delivery,
                outcome,
                (last >= first_tag).then_some((first_tag, last)),
            );
        }
        let closed = self.closed.load(Ordering::SeqCst);
        self.backoff.after(retrying.as_deref(), closed);
    }

    fn settle(&self, delivery: Delivery, outcome: Outcome, tags: Option<(u64, u64)>) {
        // (The consumer thread is gone when the session ended: the delivery is requeued.)
        let _ = self.done.send(Finished {
            delivery,
            outcome,
            publisher: self.index,
            tags,
        });
    }
}

/// A worker thread's pause after a service failed, growing while failures go on, so a
/// message is not requeued and retried in a tight loop during an outage.
#[derive(Default)]
pub(super) struct Backoff {
    failing: u32,
}

impl Backoff {
    /// After handling a delivery (or a batch of them): if one is to be retried (`retry`, its
    /// reason), waits 100 ms, 200 ms, … up to 5 s while failures go on — unless the session
    /// is over (`closed`): its deliveries return to the queue anyway. After a success, the
    /// next failure waits the least again.
    pub(super) fn after(&mut self, retry: Option<&str>, closed: bool) {
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
