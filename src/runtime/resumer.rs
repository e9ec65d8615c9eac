//! Resuming awaited nodes (`wait` by a person, `sleep` by its timer, `webhook` by its HTTP
//! call, `subflow` by its child): record the given output as each node's output, clear them
//! from the awaiting keys — atomically and only while they are still awaited, so a second
//! resume does nothing — then report their successors and publish the ready ones.

use serde_json::{json, Value};

use crate::engine::blueprint::Blueprint;
use crate::engine::events::{EventBus, FlowEvent};
use crate::engine::executor::NodeSuccess;
use crate::engine::flow::{record_output, record_worker_output};
use crate::engine::node::{ContextDeltas, ContextMap, ContextRead, ContextView};
use crate::runtime::error::Error;
use crate::runtime::message::job_id;
use crate::runtime::message::JobPayload;
use crate::runtime::metrics::Metrics;
use crate::runtime::reads::{check_reads, expected_reads, keyed_view};
use crate::runtime::scheduling::{
    awaited_details, frontier, next_jobs, node_meta, paused_iteration, RunNode,
};
use crate::services::postgres::store::{NodeCommit, RunSnapshot, RunStore};
use crate::services::rabbitmq::JobSink;
use crate::services::redis::{FinishOutcome, JoinRule, RedisCoordinationStore, SuccessorReport};
use crate::vocabulary::keys::{
    input_key, meta_key, AWAITING_DETAILS, AWAITING_NODE_IDS, BLUEPRINT_ID, PARENT_KEY,
};
use crate::vocabulary::RunStatus;

/// What a resume did.
#[derive(Debug, Clone, PartialEq)]
pub struct ResumeOutcome {
    /// The nodes resumed.
    pub nodes: Vec<String>,
    /// Whether the run completed as a result.
    pub completed: bool,
}

/// How long a node enqueued to recover a run (by the reconciler or the completion check)
/// stays locked against being enqueued again.
pub const RECOVERY_LOCK_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// What Redis says of a run once one of its jobs finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunProgress {
    /// Jobs of the run are outstanding.
    Busy,
    /// No job of the run is outstanding.
    Idle,
    /// No job registered since the ledger was (re)made is outstanding, but the ledger does
    /// not go back to the run's start: the context must confirm the run is done.
    IdleUnverified,
}

/// Everything a resume needs.
pub struct Resumer<'a> {
    /// The PostgreSQL store of run contexts and statuses.
    pub store: &'a RunStore,
    /// The Redis coordination store (job ledger and joins).
    pub coord: &'a RedisCoordinationStore,
    /// The loaded blueprints, by id.
    pub blueprints: &'a std::collections::HashMap<String, std::sync::Arc<Blueprint>>,
    /// Name of the job queue successors are published to.
    pub queue: &'a str,
    /// Where a worker counts finished runs and emits `workflow:finish` (`None` outside one).
    pub observer: Option<(&'a Metrics, &'a EventBus)>,
}

/// The successors `outcome` found ready that are published after the Redis step: all of
/// them, but those no join holds when [`Resumer::publish_immediate`] published them before.
pub(crate) fn ready_after_coordination<'s>(
    successors: &'s [SuccessorReport],
    outcome: &'s FinishOutcome,
    immediate_published: bool,
) -> impl Iterator<Item = &'s SuccessorReport> + 's {
    successors
        .iter()
        .zip(&outcome.ready)
        .filter(move |(s, ready)| {
            **ready && !(immediate_published && s.rule == JoinRule::Immediate)
        })
        .map(|(s, _)| s)
}

impl<'a> Resumer<'a> {
    /// A run driver over these stores, blueprints and job queue.
    pub fn new(
        store: &'a RunStore,
        coord: &'a RedisCoordinationStore,
        blueprints: &'a std::collections::HashMap<String, std::sync::Arc<Blueprint>>,
        queue: &'a str,
    ) -> Resumer<'a> {
        Resumer {
            store,
            coord,
            blueprints,
            queue,
            observer: None,
        }
    }

    /// The same driver, counting finished runs in `metrics` and emitting `workflow:finish`
    /// on `events`.
    pub fn observed(mut self, metrics: &'a Metrics, events: &'a EventBus) -> Resumer<'a> {
        self.observer = Some((metrics, events));
        self
    }

    /// Resumes `nodes` (all awaited nodes when `None`) of a run read as `snapshot`, as if
    /// each had finished with `success`: its output and action (`_resume.*` too), its context
    /// writes, and the fallback that stood in for it, if any. One statement applies it all,
    /// and only while the nodes are still awaited.
    pub fn resume(
        &self,
        run_id: &str,
        snapshot: RunSnapshot,
        nodes: Option<&[String]>,
        success: NodeSuccess,
        publisher: &mut dyn JobSink,
    ) -> Result<ResumeOutcome, Error> {
        let context = ContextView::new(std::sync::Arc::new(snapshot.context));
        self.resume_view(run_id, snapshot.status, context, nodes, success, publisher)
    }

    /// [`resume`](Self::resume) from a view of the run's context that may hold only some of
    /// its keys and fetch the others when read (the worker's): a resume then costs what it
    /// reads, not the run's size.
    pub(crate) fn resume_view(
        &self,
        run_id: &str,
        run_status: Option<RunStatus>,
        context: ContextView,
        nodes: Option<&[String]>,
        success: NodeSuccess,
        publisher: &mut dyn JobSink,
    ) -> Result<ResumeOutcome, Error> {
        let status = run_status.map_or("unknown", RunStatus::as_str);
        if !matches!(run_status, Some(RunStatus::Awaiting | RunStatus::Running)) {
            return Err(Error::NotAwaiting {
                run: run_id.into(),
                status: status.into(),
            });
        }
        let awaited: Vec<String> = context
            .get(AWAITING_NODE_IDS)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        let targets: Vec<String> = match nodes {
            Some(nodes) => {
                for n in nodes {
                    if !awaited.contains(n) {
                        return Err(Error::NodeNotAwaited {
                            run: run_id.into(),
                            node: n.clone(),
                        });
                    }
                }
                nodes.to_vec()
            }
            None => awaited.clone(),
        };
        if targets.is_empty() {
            return Err(Error::NotAwaiting {
                run: run_id.into(),
                status: status.into(),
            });
        }
        let blueprint_id = Blueprint::stamped_id(&context).to_string();
        let bp =
            self.blueprints
                .get(&blueprint_id)
                .ok_or_else(|| Error::RunBlueprintNotLoaded {
                    run: run_id.into(),
                    blueprint: blueprint_id.clone(),
                })?;
        // What the resumed nodes' bookkeeping and successors read, in one round trip (the
        // view may have been loaded before the blueprint was known).
        let expected: Vec<String> = targets
            .iter()
            .flat_map(|n| expected_reads(Some(bp), n))
            .collect();
        context.prefetch(&expected);
        let NodeSuccess {
            result,
            deltas,
            fallback,
            ..
        } = success;
        let (action, output) = (result.action.as_deref(), &result.output);
        let mut commit = NodeCommit::from_deltas(&deltas);
        commit.set.insert(
            "_resume.action".into(),
            action
                .map(|a| Value::String(a.into()))
                .unwrap_or(Value::Null),
        );
        commit.set.insert("_resume.output".into(), output.clone());
        let mut merged = context.clone();
        merged.delete(AWAITING_NODE_IDS);
        merged.delete(AWAITING_DETAILS);
        for k in &commit.delete {
            merged.delete(k.clone());
        }
        let iteration_of =
            |n: &str| awaited_details(&context, n).map_or(0, paused_iteration) as u32;
        // A resumed node's bookkeeping; a repeating node also records this iteration as
        // committed (the worker's commit statement does that for executed nodes).
        let record = |meta: Value, n: &str| {
            if bp.node_index(n).is_some_and(|i| bp.may_repeat(i)) {
                crate::runtime::scheduling::with_iteration(
                    meta,
                    context.get(&meta_key(n)),
                    iteration_of(n),
                )
            } else {
                meta
            }
        };
        for n in &targets {
            let mut outputs = ContextDeltas::default();
            if bp.node_index(n).is_some() {
                record_output(&mut outputs, n, fallback.as_deref(), output);
            } else {
                // A batch worker (a dynamic node): its output is gathered from `_outputs.*`.
                record_worker_output(&mut outputs, n, output);
            }
            for (k, v) in outputs.iter() {
                commit
                    .set
                    .insert(k.to_string(), v.cloned().unwrap_or(Value::Null));
            }
            // Seen as committed by the successor computation below; replaced with the full
            // record once the successors are known.
            commit.set.insert(meta_key(n), record(json!({}), n));
        }
        for (k, v) in &commit.set {
            merged.set(k.clone(), v.clone());
        }
        // Each resumed node's successors, in `targets` order.
        let mut reports: Vec<Vec<SuccessorReport>> = Vec::with_capacity(targets.len());
        for n in &targets {
            let mut mine = Vec::new();
            if let Some(node) = RunNode::resolve(bp, &merged, n) {
                let fallback = fallback.as_deref();
                for next in next_jobs(bp, &node, &result, fallback, &merged, iteration_of(n)) {
                    if let Some(input) = &next.input {
                        let key = input_key(&next.report.node);
                        let keeps_first = next.keeps_first_input(bp);
                        if !keeps_first || !merged.has(&key) {
                            merged.set(key.clone(), input.clone());
                        }
                        commit.set_input(key, input.clone(), keeps_first);
                    }
                    mine.push(next.report);
                }
            }
            let meta = node_meta(action, fallback.as_deref(), &mine);
            commit.set.insert(meta_key(n), record(meta, n));
            reports.push(mine);
        }
        check_reads(&merged)?;
        if !self.store.resume_nodes(run_id, &targets, commit)? {
            return Err(Error::AlreadyResumed(run_id.into()));
        }
        // Report each resumed node's successors as that node's (already finished) job.
        let mut progress = RunProgress::Busy;
        for (n, mine) in targets.iter().zip(&reports) {
            let job = job_id(n, iteration_of(n));
            progress = self.finish_job(run_id, bp, &job, &[], mine, publisher)?;
        }
        log::info!("run {run_id}: resumed {targets:?} with action {action:?}");
        let completed = self.complete_if_idle(run_id, progress, publisher)?;
        Ok(ResumeOutcome {
            nodes: targets,
            completed,
        })
    }

    /// Closes a finished job in the run's ledger (see
    /// [`finish_job`](RedisCoordinationStore::finish_job)), publishes the successors that
    /// became ready, and returns whether the run has outstanding work left.
    pub fn finish_job(
        &self,
        run_id: &str,
        bp: &Blueprint,
        job: &str,
        also_register: &[String],
        successors: &[SuccessorReport],
        publisher: &mut dyn JobSink,
    ) -> Result<RunProgress, Error> {
        let outcome = self
            .coord
            .finish_job(run_id, job, also_register, successors)?;
        self.publish_ready(run_id, bp.id(), successors, &outcome, false, publisher)
    }

    /// The second half of [`finish_job`](Self::finish_job), after the Redis step: publishes
    /// the successors that `outcome` found ready (but those no join holds, when
    /// `immediate_published`: [`publish_immediate`](Self::publish_immediate) did) and tells
    /// the run's progress.
    pub(crate) fn publish_ready(
        &self,
        run_id: &str,
        blueprint_id: &str,
        successors: &[SuccessorReport],
        outcome: &FinishOutcome,
        immediate_published: bool,
        publisher: &mut dyn JobSink,
    ) -> Result<RunProgress, Error> {
        let ready = ready_after_coordination(successors, outcome, immediate_published);
        self.publish_jobs(run_id, blueprint_id, ready, publisher)?;
        Ok(match (outcome.run_idle, outcome.ledger_intact) {
            (false, _) => RunProgress::Busy,
            (true, true) => RunProgress::Idle,
            (true, false) => RunProgress::IdleUnverified,
        })
    }

    /// Publishes the successors that no join holds (rule [`JoinRule::Immediate`]): they are
    /// ready whatever the Redis step reports, so a worker's tail publishes them before it,
    /// and their delivery overlaps that round trip (see [`job`](crate::runtime::worker)).
    pub(crate) fn publish_immediate(
        &self,
        run_id: &str,
        blueprint_id: &str,
        successors: &[SuccessorReport],
        publisher: &mut dyn JobSink,
    ) -> Result<(), Error> {
        let immediate = successors.iter().filter(|s| s.rule == JoinRule::Immediate);
        self.publish_jobs(run_id, blueprint_id, immediate, publisher)
    }

    /// Publishes these jobs of a run, a chunk of messages at a time (a scatter may make
    /// 100 000), paced by the publisher's confirms.
    fn publish_jobs<'s>(
        &self,
        run_id: &str,
        blueprint_id: &str,
        jobs: impl Iterator<Item = &'s SuccessorReport>,
        publisher: &mut dyn JobSink,
    ) -> Result<(), Error> {
        const CHUNK: usize = 1_024;
        let mut bodies = jobs
            .map(|s| JobPayload::new(run_id, blueprint_id, &s.node, s.iteration).to_body())
            .peekable();
        while bodies.peek().is_some() {
            let chunk: Vec<Vec<u8>> = bodies.by_ref().take(CHUNK).collect();
            publisher.publish_jobs("", self.queue, &chunk)?;
        }
        Ok(())
    }

    /// Completes the run if it is idle (see [`complete`](Resumer::complete)). If Redis
    /// could not vouch for that (its ledger does not go back to the run's start: Redis lost
    /// its state, or the ledger expired), the stored context decides: the nodes it shows
    /// still to run (the run's frontier) are enqueued instead. Returns whether this call
    /// completed the run.
    pub fn complete_if_idle(
        &self,
        run_id: &str,
        progress: RunProgress,
        publisher: &mut dyn JobSink,
    ) -> Result<bool, Error> {
        match progress {
            RunProgress::Busy => Ok(false),
            RunProgress::Idle => self.complete(run_id, publisher),
            RunProgress::IdleUnverified => {
                if self.enqueue_frontier(run_id, publisher)? {
                    Ok(false)
                } else {
                    self.complete(run_id, publisher)
                }
            }
        }
    }

    /// Completes an idle run — status `completed` with its final context, unless it awaits a
    /// node — and, if it is a subflow's child, resumes the parent's subflow node with its
    /// result (SPEC §5), which may complete the parent in turn. Returns whether this call
    /// completed the run.
    pub fn complete(&self, run_id: &str, publisher: &mut dyn JobSink) -> Result<bool, Error> {
        let Some(context) = self.store.complete_run(run_id)? else {
            return Ok(false);
        };
        self.completed(run_id, &context, publisher)?;
        Ok(true)
    }

    /// What follows a run's completion (its final `context`): a subflow's parent resumes.
    pub(crate) fn completed(
        &self,
        run_id: &str,
        context: &ContextMap,
        publisher: &mut dyn JobSink,
    ) -> Result<(), Error> {
        log::info!("run {run_id}: completed");
        if let Some((metrics, events)) = self.observer {
            metrics.runs.with_label_values(&["completed"]).inc();
            events.emit_with(|| {
                let blueprint = context.get(BLUEPRINT_ID).and_then(Value::as_str);
                let completed = RunStatus::Completed.as_str();
                FlowEvent::workflow_finish(run_id, blueprint.unwrap_or_default(), completed, None)
            });
        }
        self.resume_parent(run_id, context, publisher)
    }

    /// Enqueues what the stored context says is left to run of a running run Redis calls
    /// idle without vouching for it, as the reconciler would (its copies flagged
    /// `recovered`, poisoned nodes skipped); returns whether there was anything.
    fn enqueue_frontier(&self, run_id: &str, publisher: &mut dyn JobSink) -> Result<bool, Error> {
        let Some(snapshot) = self.store.load(run_id)? else {
            return Ok(false);
        };
        // An awaiting run may have branches still running; its awaited nodes are not in the
        // frontier.
        if !matches!(
            snapshot.status,
            Some(RunStatus::Running | RunStatus::Awaiting)
        ) {
            return Ok(false);
        }
        let Some(bp) = self
            .blueprints
            .get(Blueprint::stamped_id(&snapshot.context))
        else {
            return Ok(false);
        };
        let left = self.claim(run_id, frontier(bp, &snapshot.context), "completion check")?;
        if left.is_empty() {
            return Ok(false);
        }
        let ids = self.enqueue_recovered(run_id, bp, &left, publisher)?;
        log::warn!(
            "run {run_id}: Redis has no job of it left, but {ids:?} must still run \
             (was Redis's state lost?); enqueued them"
        );
        Ok(true)
    }

    /// The jobs of `candidates` this caller may enqueue: not poisoned, and not claimed by
    /// another recoverer (reconciler or completion check) within [`RECOVERY_LOCK_TTL`].
    pub fn claim(
        &self,
        run_id: &str,
        candidates: Vec<(String, u32)>,
        owner: &str,
    ) -> Result<Vec<(String, u32)>, Error> {
        let mut claimed = Vec::new();
        for (node, iteration) in candidates {
            let lock = self.coord.nodelock_key(run_id, &job_id(&node, iteration));
            if !self.coord.is_poisoned(run_id, &node)?
                && self
                    .coord
                    .set_if_not_exist(&lock, owner, RECOVERY_LOCK_TTL)?
            {
                claimed.push((node, iteration));
            }
        }
        Ok(claimed)
    }

    /// Registers jobs of a run in its ledger and publishes them as recovered copies (the
    /// reconciler's kind: a committed one re-derives its successors); returns their ids.
    pub fn enqueue_recovered(
        &self,
        run_id: &str,
        bp: &Blueprint,
        jobs: &[(String, u32)],
        publisher: &mut dyn JobSink,
    ) -> Result<Vec<String>, Error> {
        let ids: Vec<String> = jobs.iter().map(|(n, i)| job_id(n, *i)).collect();
        self.coord.register_jobs(run_id, &ids)?;
        let bodies: Vec<Vec<u8>> = jobs
            .iter()
            .map(|(n, i)| {
                let mut job = JobPayload::new(run_id, bp.id(), n, *i);
                job.recovered = true;
                job.to_body()
            })
            .collect();
        publisher.publish_jobs("", self.queue, &bodies)?;
        Ok(ids)
    }

    /// Resumes the subflow node that awaits `child_run`, which completed with `context`
    /// (stale or repeated notifications change nothing).
    pub(crate) fn resume_parent(
        &self,
        child_run: &str,
        context: &ContextMap,
        publisher: &mut dyn JobSink,
    ) -> Result<(), Error> {
        let Some(link) = ParentLink::of(context) else {
            return Ok(());
        };
        let Some((status, parent, details)) = link.awaiting_parent(self.store, child_run)? else {
            return Ok(());
        };
        let Some(child_bp) = self.blueprints.get(Blueprint::stamped_id(context)) else {
            return Ok(());
        };
        let (result, deltas) =
            crate::engine::nodes::subflow::subflow_result(&details, child_bp, context);
        let success = NodeSuccess {
            deltas,
            ..NodeSuccess::of(result)
        };
        let nodes = [link.node_id.clone()];
        match self.resume_view(
            &link.run_id,
            status,
            parent,
            Some(&nodes),
            success,
            publisher,
        ) {
            Ok(_) => Ok(()),
            Err(e) if !e.is_refusal() => Err(e),
            Err(other) => {
                log::debug!("subflow parent of {child_run} not resumed: {other}");
                Ok(())
            }
        }
    }
}

/// Where a child run reports: `_parent` = `{runId, nodeId, blueprintId}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParentLink {
    /// Id of the parent run.
    pub run_id: String,
    /// Id of the parent's `subflow` node that awaits the child.
    pub node_id: String,
}

impl ParentLink {
    /// The link stored in a child's context.
    pub fn of(context: &dyn ContextRead) -> Option<ParentLink> {
        let p = context.get(PARENT_KEY)?;
        Some(ParentLink {
            run_id: p.get("runId")?.as_str()?.to_string(),
            node_id: p.get("nodeId")?.as_str()?.to_string(),
        })
    }

    /// The parent run — its status and a view of its context that reads key by key — and
    /// its node's awaiting details, if that node still awaits this very child.
    pub(crate) fn awaiting_parent(
        &self,
        store: &RunStore,
        child_run: &str,
    ) -> Result<Option<(Option<RunStatus>, ContextView, Value)>, Error> {
        let Some((status, parent)) = keyed_view(store, &self.run_id, None, &self.node_id)? else {
            return Ok(None);
        };
        let details = awaited_details(&parent, &self.node_id)
            .filter(|d| d.get("childRunId").and_then(Value::as_str) == Some(child_run))
            .cloned();
        Ok(details.map(|d| (status, parent, d)))
    }
}
