//! The tail of a job — commit → coordinate → publish → complete, then settle, in that order
//! (see [`job`](super::job) for its crash windows) — run for a batch of jobs at once. A job
//! whose node executed commits first; one whose execution was committed before (a
//! redelivery, the reconciler's copy, a late or overtaken job) has nothing to commit and
//! starts at coordination.
//!
//! A worker thread does not wait for its job's tail: it hands the tail off
//! ([`Combiner`](crate::services::group::Combiner)) and takes its next delivery. Whichever thread finds
//! nobody leading runs the queued tails in batches: one commit statement for the batch, one
//! Redis pipeline for the commits that applied, then each job's publishes (on the leading
//! thread's channel) and final status, and hands each delivery to the consumer thread to be
//! acked once its publishes are confirmed. So a process keeps more jobs in flight than it
//! has threads, and its statements and pipelines carry more jobs each. A lone thread leads
//! its own tail at once: with one thread, nothing changes.
//!
//! The batch's statements run outside the store's write group (which carries pauses,
//! resumes and other completions), so two statements of one process may wait on each
//! other's rows, as statements of two processes always could; PostgreSQL breaks a deadlock
//! by failing one statement, whose writes then run again one by one.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use amiquip::Delivery;
use crossbeam_channel::{Receiver, Sender};

use crate::engine::node::ContextMap;
use crate::runtime::failpoint;
use crate::runtime::message::job_id;
use crate::runtime::message::JobPayload;
use crate::runtime::reads::expected_reads;
use crate::runtime::resumer::{ready_after_coordination, RunProgress};
use crate::services::group::Combiner;
use crate::services::postgres::store::{CommitGuard, NodeCommit, StoreError};
use crate::services::rabbitmq::AsyncPublisher;
use crate::services::redis::{JoinRule, SuccessorReport};
use crate::vocabulary::RunStatus;

use super::backoff::Backoff;
use super::consumer::Finished;
use super::consumer::Outcome;
use super::pause;
use super::read_ahead::{Derived, JobKey, MAX_PER_BATCH};
use super::shared::Shared;
use crate::runtime::error::Error;

/// Most job tails one batch carries.
pub(super) const MAX_TAILS: usize = 64;

/// What is left of a job once its node executed (or once the guard found it committed
/// before, its coordination perhaps missing).
pub(super) struct TailJob {
    pub(super) job: JobPayload,
    /// The node's id in the blueprint (what the failpoints name).
    pub(super) node_id: String,
    /// What to commit, and the guard that makes the first commit win; `None` when the job's
    /// execution is committed already and only its coordination is left.
    pub(super) commit: Option<(NodeCommit, CommitGuard)>,
    /// The run's start jobs, registered in the ledger with this one when it is one of them.
    pub(super) also_register: Vec<String>,
    /// The successors chosen, reported to their joins.
    pub(super) successors: Vec<SuccessorReport>,
    /// The state of successors the commit alone decides, for their deliveries.
    pub(super) derived: Vec<Derived>,
}

impl TailJob {
    /// The tail of a job whose execution was committed before: coordination only.
    pub(super) fn coordinate_only(
        job: &JobPayload,
        node_id: &str,
        also_register: Vec<String>,
        successors: Vec<SuccessorReport>,
    ) -> Box<TailJob> {
        Box::new(TailJob {
            job: job.clone(),
            node_id: node_id.to_string(),
            commit: None,
            also_register,
            successors,
            derived: Vec::new(),
        })
    }
}

/// A tail waiting to be run, with the delivery it settles.
pub(super) struct PendingTail {
    pub(super) delivery: Delivery,
    pub(super) tail: Box<TailJob>,
    /// The run and node of the tail.
    execution: String,
}

impl PendingTail {
    /// A tail and the delivery it settles.
    pub(super) fn new(delivery: Delivery, tail: Box<TailJob>) -> PendingTail {
        let execution = format!("{}\n{}", tail.job.run_id, tail.node_id);
        PendingTail {
            delivery,
            tail,
            execution,
        }
    }

    /// Two tails of one node of one run (copies of a job) never share a batch; tails of
    /// other nodes of the run may (the commit statements split those that write a row in
    /// common, see [`RunStore::commit_nodes`](crate::services::postgres::store::RunStore::commit_nodes)).
    pub(super) fn execution(&self) -> Option<&str> {
        Some(&self.execution)
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
    /// Deliveries to requeue after a backoff, once this thread no longer leads (see
    /// [`settle_deferred`](Self::settle_deferred)), with the reason.
    pub(super) deferred: Vec<(Delivery, String)>,
    /// The deliveries waiting for a worker thread (see [`reads_ahead`](Self::reads_ahead)).
    pub(super) waiting: &'a Receiver<Delivery>,
    /// The session's handed-off tails (see [`reads_ahead`](Self::reads_ahead)).
    pub(super) tails: &'a Combiner<PendingTail>,
}

impl Leader<'_> {
    /// Runs a batch of tails and hands each delivery on to be settled. If that panics, the
    /// deliveries not yet handed on are requeued: the batch does not tell whose tail
    /// panicked, and a job whose commit applied must come back to coordinate. (A tail that
    /// panics each time is dead-lettered after repeated failures, as any failing job.)
    pub(super) fn run(&mut self, batch: Vec<PendingTail>) {
        let mut pending: Vec<Option<PendingTail>> = batch.into_iter().map(Some).collect();
        let reason = match catch_unwind(AssertUnwindSafe(|| self.run_batch(&mut pending))) {
            Ok(()) => "its tail was left unsettled",
            Err(_) => "a batch of job tails panicked",
        };
        for p in pending.iter_mut().filter_map(Option::take) {
            let reason = format!("{}: {reason}", p.tail.job.describe());
            log::error!("{reason}; requeueing it");
            self.settle(p.delivery, Outcome::Retry(reason), None);
        }
    }

    /// Requeues the deliveries of batches in which nothing succeeded (a service is failing),
    /// after the thread's backoff: called once it no longer leads, so that the wait holds up
    /// no other thread's tails.
    pub(super) fn settle_deferred(&mut self) {
        let Some((_, reason)) = self.deferred.first() else {
            return;
        };
        let reason = reason.clone();
        self.backoff
            .after(Some(&reason), self.closed.load(Ordering::SeqCst));
        for (delivery, reason) in std::mem::take(&mut self.deferred) {
            self.settle(delivery, Outcome::Retry(reason), None);
        }
    }

    /// Commit, coordinate, publish and complete for the tails in `pending`; each is taken out
    /// of its slot only as its delivery is handed on, so a panic finds the rest there.
    fn run_batch(&mut self, pending: &mut [Option<PendingTail>]) {
        let shared = self.shared;
        let mut retries: Vec<(usize, String)> = Vec::new();
        let mut succeeded = false;
        // Commit: one statement for the tails that have something to commit; the others go
        // straight to coordination.
        let mut committing = Vec::new();
        let mut coordinating = Vec::new();
        let mut commits = Vec::new();
        for (i, slot) in pending.iter_mut().enumerate() {
            let Some(p) = slot else { continue };
            match p.tail.commit.take() {
                Some((commit, guard)) => {
                    committing.push(i);
                    commits.push((p.tail.job.run_id.clone(), commit, guard));
                }
                None => coordinating.push(i),
            }
        }
        if !commits.is_empty() {
            shared.metrics.commit_batch.observe(commits.len() as f64);
        }
        // (A derived entry's age counts from before the statement, whose snapshot it is.)
        let committing_at = Instant::now();
        let applied = shared.store.commit_nodes(commits);
        // The state of successors the commits decide, for their deliveries (stored at once,
        // before any is published).
        let mut derived = Vec::new();
        for (i, applied) in committing.into_iter().zip(applied) {
            let Some(p) = &mut pending[i] else { continue };
            let decided = std::mem::take(&mut p.tail.derived);
            let t = &*p.tail;
            match applied {
                Ok(Some(status)) => {
                    // Only while the run, as the commit saw it, is running (a job of a
                    // finished run is dropped).
                    if status == Some(RunStatus::Running) {
                        derived.extend(decided);
                    }
                    failpoint::hit("after_commit", &t.node_id);
                    coordinating.push(i);
                }
                Ok(None) => {
                    log::debug!(
                        "run {}: node '{}' was committed by another delivery",
                        t.job.run_id,
                        t.node_id
                    );
                    succeeded = true;
                    self.settle_slot(&mut pending[i], Outcome::Ack, None);
                }
                Err(e) if e.is_permanent() => {
                    // PostgreSQL refuses this data (the node's own checks make this rare; see
                    // `limits`).
                    let e = Error::from(e);
                    let before = self.publisher.published();
                    match pause::fail_on_refused_data(shared, &t.job, &e, self.publisher) {
                        Ok(()) => {
                            succeeded = true;
                            let tags = Tags::default().with(before, self.publisher.published());
                            self.settle_slot(&mut pending[i], Outcome::Ack, tags.range());
                        }
                        Err(e) => retries.push((i, failure(&t.job, e))),
                    }
                }
                Err(e) => retries.push((i, failure(&t.job, e))),
            }
        }
        shared.read_ahead.put(derived, committing_at);
        // Publish first the successors no join holds, and read their run state ahead (see
        // `read_ahead`): their delivery overlaps the Redis step. A start job publishes after
        // it, as it registers the run's start jobs there.
        let resumer = shared.resumer();
        let reading_ahead = self.reads_ahead();
        let mut ahead: Vec<(JobKey, Vec<String>)> = Vec::new();
        let mut early_tags: HashMap<usize, Tags> = HashMap::new();
        coordinating.retain(|&i| {
            let Some(t) = tail(pending, i) else {
                return false;
            };
            if !t.also_register.is_empty() {
                return true;
            }
            if reading_ahead {
                let immediate = t
                    .successors
                    .iter()
                    .filter(|s| s.rule == JoinRule::Immediate);
                self.reserve_ahead(t, immediate, &mut ahead);
            }
            let before = self.publisher.published();
            let published = resumer.publish_immediate(
                &t.job.run_id,
                &t.job.blueprint_id,
                &t.successors,
                self.publisher,
            );
            let tags = Tags::default().with(before, self.publisher.published());
            match published {
                Ok(()) => {
                    failpoint::hit("before_coordinate", &t.node_id);
                    early_tags.insert(i, tags);
                    true
                }
                Err(e) => {
                    retries.push((i, failure(&t.job, e)));
                    false
                }
            }
        });
        self.read_ahead(&mut ahead);
        // Coordinate: one Redis pipeline.
        let calls = coordinating
            .iter()
            .filter_map(|&i| tail(pending, i))
            .map(|t| {
                let me = job_id(&t.job.node_id, t.job.iteration);
                let successors = t.successors.clone();
                (
                    t.job.run_id.clone(),
                    me,
                    t.also_register.clone(),
                    successors,
                )
            })
            .collect();
        let finished = shared.coord.finish_jobs(calls);
        // Publish each job's other ready successors, noting the delivery tags of its
        // publishes.
        let mut published = Vec::new();
        let mut acked: Vec<(usize, Tags)> = Vec::new();
        for (i, finished) in coordinating.into_iter().zip(finished) {
            let Some(t) = tail(pending, i) else { continue };
            let early = early_tags.remove(&i);
            let before = self.publisher.published();
            let progress = finished.map_err(Error::from).and_then(|outcome| {
                if reading_ahead {
                    let ready = ready_after_coordination(&t.successors, &outcome, early.is_some());
                    self.reserve_ahead(t, ready, &mut ahead);
                }
                let progress = resumer.publish_ready(
                    &t.job.run_id,
                    &t.job.blueprint_id,
                    &t.successors,
                    &outcome,
                    early.is_some(),
                    self.publisher,
                )?;
                failpoint::hit("after_publish", &t.job.node_id);
                Ok(progress)
            });
            let tags = early
                .unwrap_or_default()
                .with(before, self.publisher.published());
            match progress {
                Ok(progress) => published.push((i, progress, tags)),
                Err(e) => retries.push((i, failure(&t.job, e))),
            }
        }
        self.read_ahead(&mut ahead);
        // Final status: the runs now idle complete in one statement.
        let mut idle: Vec<String> = published
            .iter()
            .filter(|(_, progress, _)| matches!(progress, RunProgress::Idle))
            .filter_map(|&(i, _, _)| tail(pending, i))
            .map(|t| t.job.run_id.clone())
            .collect();
        // (A run named twice is completed once, for its first tail here.)
        idle.sort_unstable();
        idle.dedup();
        let mut completed: HashMap<String, Result<Option<ContextMap>, StoreError>> = idle
            .iter()
            .cloned()
            .zip(shared.store.complete_runs(&idle))
            .collect();
        for (i, progress, tags) in published {
            let Some(t) = tail(pending, i) else { continue };
            let run_id = &t.job.run_id;
            let before = self.publisher.published();
            let result = match progress {
                RunProgress::Busy => Ok(()),
                RunProgress::Idle => match completed.remove(run_id) {
                    Some(Ok(Some(context))) => resumer.completed(run_id, &context, self.publisher),
                    Some(Ok(None)) => Ok(()),
                    Some(Err(e)) => Err(e.into()),
                    // Its completion went with another tail of the run in this batch.
                    None => Ok(()),
                },
                RunProgress::IdleUnverified => resumer
                    .complete_if_idle(run_id, progress, self.publisher)
                    .map(|_| ()),
            };
            let tags = tags.with(before, self.publisher.published());
            match result {
                Ok(()) => acked.push((i, tags)),
                Err(e) => retries.push((i, failure(&t.job, e))),
            }
        }
        // Settled in the order of their first tags, so that the consumer thread sees each
        // publisher's ranges in order (it forgets refusals before the range it checks).
        acked.sort_by_key(|(_, tags)| tags.first);
        succeeded |= !acked.is_empty();
        for (i, tags) in acked {
            self.settle_slot(&mut pending[i], Outcome::Ack, tags.range());
        }
        // Retries. When nothing in the batch succeeded (a service is failing), they are
        // requeued after a backoff, as a lone job's would be (`settle_deferred`); an isolated
        // failure (one bad row) is requeued at once.
        if succeeded {
            self.backoff.after(None, false);
        }
        for (i, reason) in retries {
            let Some(p) = pending[i].take() else { continue };
            if succeeded {
                log::warn!("{reason}; retrying");
                self.settle(p.delivery, Outcome::Retry(reason), None);
            } else {
                self.deferred.push((p.delivery, reason));
            }
        }
    }

    /// Whether this batch reads its successors' state ahead: not while deliveries wait for
    /// a worker thread (a successor's delivery would queue behind them), nor while other
    /// tails wait for this thread (its time is then what the process's throughput waits on,
    /// and the worker threads, idle meanwhile, read their jobs' state themselves); and then
    /// only while [worthwhile](super::read_ahead::ReadAhead::worthwhile).
    fn reads_ahead(&self) -> bool {
        self.waiting.is_empty() && self.tails.queued() == 0 && self.shared.read_ahead.worthwhile()
    }

    /// Reserves read-ahead entries for these successors of `t`, about to be published, if
    /// the batch reads ahead no more than [`MAX_PER_BATCH`] in all.
    fn reserve_ahead<'t>(
        &self,
        t: &TailJob,
        successors: impl Iterator<Item = &'t SuccessorReport>,
        ahead: &mut Vec<(JobKey, Vec<String>)>,
    ) {
        let jobs: Vec<JobKey> = successors
            .map(|s| (t.job.run_id.clone(), s.node.clone(), s.iteration))
            .collect();
        if jobs.is_empty() || ahead.len() + jobs.len() > MAX_PER_BATCH {
            return;
        }
        let bp = self
            .shared
            .blueprints
            .get(&t.job.blueprint_id)
            .map(|b| &**b);
        for job in self.shared.read_ahead.reserve(jobs) {
            let keys = expected_reads(bp, &job.1);
            ahead.push((job, keys));
        }
    }

    /// Reads the run state of the successors reserved in `ahead` (one statement) and hands
    /// it to their deliveries.
    fn read_ahead(&self, ahead: &mut Vec<(JobKey, Vec<String>)>) {
        if ahead.is_empty() {
            return;
        }
        let (jobs, keys): (Vec<JobKey>, Vec<Vec<String>>) = ahead.drain(..).unzip();
        let requests = jobs.iter().map(|j| j.0.clone()).zip(keys.clone()).collect();
        let loading_at = Instant::now();
        let snapshots = self.shared.store.load_keys_of(requests);
        let loads = jobs.into_iter().zip(keys).zip(snapshots);
        self.shared.read_ahead.fill(
            loads.map(|((job, keys), s)| (job, keys, s)).collect(),
            loading_at,
        );
    }

    fn settle_slot(
        &self,
        slot: &mut Option<PendingTail>,
        outcome: Outcome,
        tags: Option<(u64, u64)>,
    ) {
        if let Some(p) = slot.take() {
            self.settle(p.delivery, outcome, tags);
        }
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

/// Why a job's tail is to be retried.
fn failure(job: &JobPayload, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", job.describe())
}

/// The tail in slot `i`, unless its delivery was handed on.
fn tail(pending: &[Option<PendingTail>], i: usize) -> Option<&TailJob> {
    pending[i].as_ref().map(|p| &*p.tail)
}

/// The delivery tags of one job's publishes: those of its successors and, later, those of
/// its run's completion (a subflow's parent). Between the two, other jobs may publish; a
/// range spans them only when a job publishes in both steps (a child run's last job).
#[derive(Clone, Copy, Default)]
struct Tags {
    first: Option<u64>,
    last: Option<u64>,
}

impl Tags {
    /// With the publishes numbered `before + 1 ..= after` (none if `after == before`).
    fn with(self, before: u64, after: u64) -> Tags {
        if after <= before {
            return self;
        }
        Tags {
            first: self.first.or(Some(before + 1)),
            last: Some(after),
        }
    }

    fn range(self) -> Option<(u64, u64)> {
        self.first.zip(self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::Tags;

    #[test]
    fn a_job_s_tags_cover_its_own_publishes_only() {
        // Published nothing: no range (it is acked without waiting for others' confirms).
        assert_eq!(Tags::default().with(4, 4).with(9, 9).range(), None);
        // Its successors only.
        assert_eq!(Tags::default().with(4, 6).with(9, 9).range(), Some((5, 6)));
        // Its run's completion only (a subflow's parent resumed).
        assert_eq!(
            Tags::default().with(4, 4).with(9, 10).range(),
            Some((10, 10))
        );
        // Both: the range spans the others' publishes between them.
        assert_eq!(
            Tags::default().with(4, 5).with(9, 10).range(),
            Some((5, 10))
        );
    }
}
