//! The reconciler: finds `running` runs that have not moved for a while and enqueues their
//! frontier, so a lost message never loses a run.
//!
//! For each stalled run it computes the frontier from the stored context (start nodes
//! without output; nodes whose predecessors' taken edges satisfy their join), skips nodes
//! carrying a poison or cancel pill, takes a short per-node lock (so two reconcilers do not
//! both enqueue), registers the jobs in the run's ledger and publishes them. A run with an
//! empty frontier and no awaited node is complete, and is marked so.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::amqp::{self, ConfirmPublisher, JobSink};
use crate::blueprint::Blueprint;
use crate::coordination::{job_id, parse_job_id, RedisCoordinationStore};
use crate::protocol::JobPayload;
use crate::scheduling::frontier;
use crate::store::RunStore;
use crate::worker::WorkerError;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconciliationStats {
    /// Runs found idle longer than the threshold.
    pub stalled_runs: usize,
    /// Runs that got jobs enqueued, or were found complete.
    pub reconciled_runs: usize,
    /// Runs that could not be reconciled (unknown blueprint, unreadable state).
    pub failed_runs: usize,
}

/// Finds and resumes stalled runs.
#[derive(Clone)]
pub struct Reconciler {
    store: RunStore,
    coord: RedisCoordinationStore,
    blueprints: HashMap<String, Arc<Blueprint>>,
    amqp_url: String,
    queue: String,
    stalled_after: Duration,
    lock_ttl: Duration,
    batch: i64,
}

impl Reconciler {
    /// A reconciler over the services a worker uses.
    pub fn new(
        store: RunStore,
        coord: RedisCoordinationStore,
        blueprints: HashMap<String, Arc<Blueprint>>,
        amqp_url: String,
        queue: String,
    ) -> Reconciler {
        Reconciler {
            store,
            coord,
            blueprints,
            amqp_url,
            queue,
            stalled_after: Duration::from_secs(300),
            lock_ttl: Duration::from_secs(30),
            batch: 500,
        }
    }

    /// How long a run may be idle before it counts as stalled (default 300 s).
    pub fn stalled_after(mut self, after: Duration) -> Self {
        self.stalled_after = after;
        self
    }

    /// One pass.
    pub fn run(&self) -> Result<ReconciliationStats, WorkerError> {
        let stalled = self.store.stalled_runs(self.stalled_after, self.batch)?;
        let mut stats = ReconciliationStats {
            stalled_runs: stalled.len(),
            ..Default::default()
        };
        if stalled.is_empty() {
            return Ok(stats);
        }
        let mut connection = amqp::connect(&self.amqp_url)?;
        let mut publisher = ConfirmPublisher::new(connection.open_channel(None)?)?;
        amqp::declare_job_queue(publisher.channel(), &self.queue)?;
        for run in &stalled {
            match self.reconcile_run(run, &mut publisher) {
                Ok(true) => stats.reconciled_runs += 1,
                Ok(false) => {}
                Err(e) => {
                    log::warn!("reconciler: run {run}: {e}");
                    stats.failed_runs += 1;
                }
            }
        }
        let _ = publisher.close();
        let _ = connection.close();
        Ok(stats)
    }

    fn reconcile_run(
        &self,
        run: &str,
        publisher: &mut ConfirmPublisher,
    ) -> Result<bool, WorkerError> {
        let Some(snapshot) = self.store.load(run)? else {
            return Err(WorkerError::Options(format!(
                "run {run} has a status row but no context row"
            )));
        };
        let blueprint_id = Blueprint::stamped_id(&snapshot.context);
        let Some(bp) = self.blueprints.get(blueprint_id) else {
            return Err(WorkerError::Options(format!(
                "run {run}: blueprint '{blueprint_id}' is not loaded (or the run's first job never ran)"
            )));
        };
        // What should run: the frontier derived from the context, plus every job the run's
        // ledger says was made ready and never finished (it covers loop iterations too).
        let mut candidates = frontier(bp, &snapshot.context);
        let (outstanding, has_ledger) = self.coord.outstanding_jobs(run)?;
        for job in outstanding {
            let (node, iteration) = parse_job_id(&job);
            if !candidates
                .iter()
                .any(|(n, i)| *n == node && *i == iteration)
            {
                candidates.push((node, iteration));
            }
        }
        let nothing_to_run = candidates.is_empty();
        let mut jobs = Vec::new();
        for (node, iteration) in candidates {
            if self.coord.is_poisoned(run, &node)? {
                continue;
            }
            let lock = self.coord.nodelock_key(run, &job_id(&node, iteration));
            if self
                .coord
                .set_if_not_exist(&lock, "reconciler", self.lock_ttl)?
            {
                jobs.push((node, iteration));
            }
        }
        if jobs.is_empty() {
            // Complete only a run with nothing to run whose ledger confirms it is idle (a run
            // without ledger has never had a job finish; a node locked by another reconciler
            // is being enqueued): otherwise leave it to a later pass.
            let resumer = crate::resume::Resumer {
                store: &self.store,
                coord: &self.coord,
                blueprints: &self.blueprints,
                queue: &self.queue,
            };
            // Completing a subflow child also resumes its parent.
            let completed = nothing_to_run && has_ledger && resumer.complete(run, publisher)?;
            if completed {
                log::info!("reconciler: run {run} had nothing left to do; completed");
            } else {
                self.store.touch(run)?;
            }
            return Ok(completed);
        }
        let ids: Vec<String> = jobs.iter().map(|(n, i)| job_id(n, *i)).collect();
        self.coord.register_jobs(run, &ids)?;
        let bodies: Vec<Vec<u8>> = jobs
            .iter()
            .map(|(n, i)| {
                let mut job = JobPayload::new(run, bp.id(), n, *i);
                job.recovered = true;
                job.to_body()
            })
            .collect();
        publisher.publish_jobs("", &self.queue, &bodies)?;
        self.store.touch(run)?;
        log::info!("reconciler: run {run}: enqueued {ids:?}");
        Ok(true)
    }
}
