//! The reconciler: finds `running` runs that have not moved for a while and enqueues their
//! frontier, so a lost message never loses a run; and wakes `awaiting` runs whose wake-up
//! was lost.
//!
//! For each stalled run it computes the frontier from the stored context (start nodes
//! without output; nodes whose predecessors' taken edges satisfy their join), skips nodes
//! carrying a poison or cancel pill, takes a short per-node lock (so two reconcilers do not
//! both enqueue), registers the jobs in the run's ledger and publishes them. A run with an
//! empty frontier and no awaited node is complete, and is marked so.
//!
//! An awaiting run waits for a message too: a sleep's timer, or the notice of a finished
//! child run. Each pass also reads the next page of awaiting runs idle past the threshold
//! (continuing where the last pass stopped, so all are read in turn and none is rewritten),
//! with the paused nodes whose wake-up is overdue: a sleep past `wakeUpAt` by the threshold,
//! a subflow whose child run finished more than the threshold ago or was never created.
//! Each such node gets a `wake` job: if the node still awaits, the worker repeats what
//! follows its pause (arms the timer, starts or re-notifies the child), as it does for a
//! redelivered pause; otherwise the job does nothing. Waits for a person or a webhook have
//! nothing to repeat.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use amiquip::Connection;

use crate::engine::blueprint::Blueprint;
use crate::engine::events::EventBus;
use crate::engine::nodes::now_ms;
use crate::runtime::error::Error;
use crate::runtime::message::parse_job_id;
use crate::runtime::message::JobPayload;
use crate::runtime::metrics::Metrics;
use crate::runtime::scheduling::frontier;
use crate::services::postgres::store::{AwaitingCursor, AwaitingRun, RunStore};
use crate::services::rabbitmq::AmqpError;
use crate::services::rabbitmq::{self as amqp, ConfirmPublisher, JobSink};
use crate::services::redis::RedisCoordinationStore;

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
    /// Awaiting runs whose overdue wake-up (a sleep's timer, a finished child's notice) was
    /// sent again.
    #[serde(default)]
    pub woken_runs: usize,
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
    batch: i64,
    /// Where the last pass's page of awaiting runs ended, shared by clones.
    awaiting_cursor: Arc<Mutex<Option<AwaitingCursor>>>,
    /// A worker's metrics and events, which the runs this completes count in.
    observer: Option<(Arc<Metrics>, EventBus)>,
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
            batch: 500,
            awaiting_cursor: Arc::new(Mutex::new(None)),
            observer: None,
        }
    }

    /// Counts the runs this completes in a worker's `metrics` and tells `events`' listeners,
    /// as the worker's own completions do.
    pub(crate) fn observed(mut self, metrics: Arc<Metrics>, events: EventBus) -> Self {
        self.observer = Some((metrics, events));
        self
    }

    /// How long a run may be idle before it counts as stalled (default 300 s); also how long
    /// an awaiting run must be idle, and a sleep overdue, before its wake-up is sent again.
    /// Commits move a run's `updated_at` at most once a second, so keep this well above a
    /// second: below, a busy run can look idle, and gets (harmless) duplicate jobs.
    pub fn stalled_after(mut self, after: Duration) -> Self {
        self.stalled_after = after;
        self
    }

    /// How many runs one pass looks at, of each kind: stalled running runs, and awaiting
    /// runs checked for lost wake-ups (default 500).
    pub fn batch_size(mut self, runs: u32) -> Self {
        self.batch = i64::from(runs.max(1));
        self
    }

    fn resumer(&self) -> crate::runtime::resumer::Resumer<'_> {
        let resumer = crate::runtime::resumer::Resumer::new(
            &self.store,
            &self.coord,
            &self.blueprints,
            &self.queue,
        );
        match &self.observer {
            Some((metrics, events)) => resumer.observed(metrics, events),
            None => resumer,
        }
    }

    /// One pass.
    pub fn run(&self) -> Result<ReconciliationStats, Error> {
        let stalled = self.store.stalled_runs(self.stalled_after, self.batch)?;
        let mut stats = ReconciliationStats {
            stalled_runs: stalled.len(),
            ..Default::default()
        };
        let mut publisher = LazyPublisher {
            url: &self.amqp_url,
            queue: &self.queue,
            state: PublisherState::Closed,
        };
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
        // Awaiting runs come second: a failure here leaves the pass over running runs done.
        match self.wake_page(&mut publisher) {
            Ok((woken, failed)) => {
                stats.woken_runs = woken;
                stats.failed_runs += failed;
            }
            Err(e) => log::warn!("reconciler: cannot look for lost wake-ups: {e}"),
        }
        if let PublisherState::Open(open) = publisher.state {
            let (connection, publisher) = *open;
            let _ = publisher.close();
            let _ = connection.close();
        }
        Ok(stats)
    }

    /// Looks at the next page of idle awaiting runs (each pass continues where the last one
    /// stopped, so every awaiting run is looked at in turn, without rewriting any) and sends
    /// their lost wake-ups again. Returns how many runs were woken and how many failed.
    fn wake_page(&self, publisher: &mut LazyPublisher<'_>) -> Result<(usize, usize), Error> {
        let mut cursor = self
            .awaiting_cursor
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let page =
            self.store
                .awaiting_page(self.stalled_after, now_ms(), cursor.as_ref(), self.batch)?;
        // A short page was the last: the next pass starts over.
        *cursor = match page.last() {
            Some(last) if page.len() as i64 >= self.batch => Some(last.cursor.clone()),
            _ => None,
        };
        drop(cursor);
        let (mut woken, mut failed) = (0, 0);
        for run in page.iter().filter(|r| !r.lost_wake_ups.is_empty()) {
            match self.wake_run(run, publisher) {
                Ok(true) => woken += 1,
                Ok(false) => {}
                Err(e) => {
                    log::warn!("reconciler: awaiting run {}: {e}", run.cursor.run_id);
                    failed += 1;
                }
            }
        }
        Ok((woken, failed))
    }

    /// Sends again the lost wake-ups of an awaiting run, as `wake` jobs of its paused nodes;
    /// returns whether it sent any.
    fn wake_run(
        &self,
        run: &AwaitingRun,
        publisher: &mut LazyPublisher<'_>,
    ) -> Result<bool, Error> {
        let run_id = run.cursor.run_id.as_str();
        let blueprint_id = run.blueprint_id.as_deref().unwrap_or_default();
        if !self.blueprints.contains_key(blueprint_id) {
            return Err(Error::RunBlueprintNotLoaded {
                run: run_id.to_string(),
                blueprint: blueprint_id.to_string(),
            });
        }
        let claimed = self
            .resumer()
            .claim(run_id, run.lost_wake_ups.clone(), "reconciler")?;
        let woken: Vec<&str> = claimed.iter().map(|(node, _)| node.as_str()).collect();
        let bodies: Vec<Vec<u8>> = claimed
            .iter()
            .map(|(node, iteration)| {
                let mut job = JobPayload::new(run_id, blueprint_id, node, *iteration);
                job.wake = true;
                job.to_body()
            })
            .collect();
        if bodies.is_empty() {
            return Ok(false);
        }
        publisher.get()?.publish_jobs("", &self.queue, &bodies)?;
        // Out of the idle window while the worker wakes it.
        self.store.touch(run_id)?;
        log::info!("reconciler: run {run_id}: sent the lost wake-ups of {woken:?} again");
        Ok(true)
    }

    fn reconcile_run(&self, run: &str, publisher: &mut LazyPublisher<'_>) -> Result<bool, Error> {
        let Some(snapshot) = self.store.load(run)? else {
            return Err(Error::MissingContext(run.to_string()));
        };
        let resumer = self.resumer();
        let blueprint_id = Blueprint::stamped_id(&snapshot.context);
        let Some(bp) = self.blueprints.get(blueprint_id) else {
            return Err(Error::RunBlueprintNotLoaded {
                run: run.to_string(),
                blueprint: blueprint_id.to_string(),
            });
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
        let jobs = resumer.claim(run, candidates, "reconciler")?;
        if jobs.is_empty() {
            // Complete only a run with nothing to run whose ledger confirms it is idle (a run
            // without ledger has never had a job finish; a node locked by another reconciler
            // is being enqueued): otherwise leave it to a later pass.
            // Completing a subflow child also resumes its parent.
            let completed =
                nothing_to_run && has_ledger && resumer.complete(run, publisher.get()?)?;
            if completed {
                log::info!("reconciler: run {run} had nothing left to do; completed");
            } else {
                self.store.touch(run)?;
            }
            return Ok(completed);
        }
        let ids = resumer.enqueue_recovered(run, bp, &jobs, publisher.get()?)?;
        self.store.touch(run)?;
        log::info!("reconciler: run {run}: enqueued {ids:?}");
        Ok(true)
    }
}

/// The pass's AMQP connection, opened on first use: a pass with nothing to publish does not
/// connect, and one whose connection failed does not try again for every run.
struct LazyPublisher<'a> {
    url: &'a str,
    queue: &'a str,
    state: PublisherState,
}

enum PublisherState {
    Closed,
    Open(Box<(Connection, ConfirmPublisher)>),
    Failed(String),
}

impl LazyPublisher<'_> {
    fn get(&mut self) -> Result<&mut ConfirmPublisher, Error> {
        if let PublisherState::Closed = self.state {
            self.state = match self.open() {
                Ok(open) => PublisherState::Open(Box::new(open)),
                Err(e) => PublisherState::Failed(e.to_string()),
            };
        }
        match &mut self.state {
            PublisherState::Open(open) => Ok(&mut open.1),
            PublisherState::Failed(reason) => Err(AmqpError::Unavailable(reason.clone()).into()),
            PublisherState::Closed => Err(AmqpError::Closed.into()),
        }
    }

    fn open(&self) -> Result<(Connection, ConfirmPublisher), Error> {
        let mut connection = amqp::connect(self.url)?;
        let publisher = ConfirmPublisher::new(connection.open_channel(None)?)?;
        amqp::declare_job_queue(publisher.channel(), self.queue)?;
        Ok((connection, publisher))
    }
}
