//! The per-job protocol (SPEC §6). [`handle`] is the whole of it, one named step a line:
//!
//! 1. **parse** the delivery: a job, a sleep's timer, or a webhook's event;
//! 2. **guard**: the blueprint, the run and its version, the node; then idempotency — a job
//!    whose node is committed (or awaited) is not executed again;
//! 3. **execute** the node, holding no connection ([`execute_node`]);
//! 4. **build the commit**: output, bookkeeping, the successors chosen and their inputs;
//! 5. **commit** (one statement, guarded: the first commit of a node's execution wins),
//! 6. **publish** the successors no join holds (their run state read ahead while the broker
//!    delivers them, [`read_ahead`](super::read_ahead)), **coordinate** (Redis: report to
//!    the joins, register the ready jobs in the run's ledger), **publish** the successors
//!    the joins made ready, **complete** the run if nothing is left — steps 5–6 are the
//!    job's *tail*, handed off and run batched with other threads' tails
//!    ([`tail`](super::tail));
//! 7. **settle**: the consumer thread acks the delivery once the broker confirmed its
//!    publishes, or requeues or dead-letters it ([`consumer`](super::consumer)).
//!
//! A job that needs no execution is settled at once (step 2), or — when its node committed
//! before and its coordination may be missing — goes straight to a tail with nothing to
//! commit. Pausing nodes commit their pause in step 4 ([`pause`](super::pause)). Each crash
//! window is described once, here:
//!
//! - Crash before the commit: nothing was written; the redelivery executes the node again
//!   (node code runs at least once).
//! - Crash after the commit, before the Redis step or the publish: the redelivery (flagged
//!   `redelivered`) finds the node's execution committed, skips execution and re-derives
//!   the successors from the stored output; the join scripts are idempotent and a join's
//!   firing lock remembers which predecessor fired it, so that predecessor fires it again.
//! - Crash after the publish, before the ack: as above; successors may be published twice,
//!   and their own guards make the copies harmless.
//!
//! A successor published before its predecessor's Redis step may finish first. The run
//! cannot look idle then: the predecessor is in the ledger's jobs and not yet in its done
//! set (or, if it was itself published that way, the job that published it is, and so on
//! back to a job whose Redis step registered it), so only the last Redis step of the run
//! finds it idle. A start job, which registers the run's start jobs, publishes after its
//! Redis step.
//!
//! A *duplicate* message (neither a redelivery nor the reconciler's `recovered` copy) whose
//! node is already committed is acked without re-publishing: the original delivery
//! publishes (or, if it crashed, will be redelivered and publish).

use serde_json::{json, Value};

use crate::engine::blueprint::{Blueprint, JoinStrategy};
use crate::engine::events::{EventKind, FlowEvent};
use crate::engine::executor::{execute_node, NodeFailure, NodeJob, NodeSuccess};
use crate::engine::flow;
use crate::engine::node::{ContextDeltas, ContextRead, ContextView, NodeResult};
use crate::engine::nodes::{batch, now_ms};
use crate::runtime::error::Error;
use crate::runtime::message::{job_id, JobPayload, Message};
use crate::runtime::reads::{check_reads, keyed_view, view_of};
use crate::runtime::resumer::ParentLink;
use crate::runtime::scheduling::{
    self, awaited_details, executions, is_committed, next_jobs, paused_iteration, RunNode,
};
use crate::services::postgres::store::{CommitGuard, Execution, NodeCommit};
use crate::services::rabbitmq::JobSink;
use crate::services::redis::SuccessorReport;
use crate::vocabulary::keys::{
    input_key, meta_key, output_key, BLUEPRINT_ID, BLUEPRINT_VERSION, INPUTS_PREFIX,
};

use super::consumer::Outcome;
use super::pause::{self, Prepared};
use super::read_ahead;
use super::shared::Shared;
use super::tail::TailJob;

/// What a worker thread does next with a delivery it handled.
pub(super) enum Handled {
    /// Settle it with this outcome (step 7).
    Done(Outcome),
    /// Commit and coordinate it (steps 5–6, [`tail`](super::tail)), then settle it.
    Tail(Box<TailJob>),
}

impl From<Outcome> for Handled {
    fn from(outcome: Outcome) -> Self {
        Handled::Done(outcome)
    }
}

/// The per-job protocol for one delivery body, up to its tail (see the module docs).
pub(super) fn handle(
    shared: &Shared,
    body: &[u8],
    redelivered: bool,
    publisher: &mut dyn JobSink,
) -> Handled {
    // 1. Parse.
    let job = match Message::parse(body) {
        Err(reason) => return Outcome::DeadLetter(reason).into(),
        Ok(Message::Event(event)) => {
            return pause::on_event(shared, &event, publisher)
                .unwrap_or_else(|e| retry(&event.event, e))
                .into()
        }
        Ok(Message::Job(job)) if job.timer => {
            return pause::on_timer(shared, &job, publisher)
                .unwrap_or_else(|e| retry(&job.describe(), e))
                .into()
        }
        Ok(Message::Job(job)) => job,
    };
    log::debug!(
        "run {}: job {} (iteration {})",
        job.run_id,
        job.node_id,
        job.iteration
    );
    process(shared, &job, redelivered, publisher)
        .unwrap_or_else(|e| failed(shared, &job, e, publisher).into())
}

/// A step failed. A service failure is retried; data PostgreSQL refuses fails the run with
/// PostgreSQL's reason (retrying would fail the same way).
fn failed(shared: &Shared, job: &JobPayload, e: Error, publisher: &mut dyn JobSink) -> Outcome {
    if !e.is_permanent() {
        return retry(&job.describe(), e);
    }
    match pause::fail_on_refused_data(shared, job, &e, publisher) {
        Ok(()) => Outcome::Ack,
        Err(e) => retry(&job.describe(), e),
    }
}

/// Steps 2–4 of a job; its tail does the rest.
fn process(
    shared: &Shared,
    job: &JobPayload,
    redelivered: bool,
    publisher: &mut dyn JobSink,
) -> Result<Handled, Error> {
    // 2. Guard.
    let (bp, node, context) = match guard(shared, job, redelivered, publisher)? {
        Guarded::Execute { bp, node, context } => (bp, node, context),
        Guarded::Settle(outcome) => return Ok(outcome.into()),
        Guarded::Coordinate(tail, context) => {
            check_reads(&context)?;
            return Ok(Handled::Tail(tail));
        }
    };
    check_reads(&context)?;
    // 3. Execute.
    let (snapshot, executed, execution) = execute(shared, bp, job, &node, context);
    // A key the node read on demand could not be fetched: what it did (a failure too) was
    // decided without it.
    check_reads(&snapshot)?;
    let success = match executed {
        Ok(success) => success,
        Err(NodeFailure {
            retry_after_ms: Some(delay),
            attempts,
            message,
            ..
        }) => {
            let max = node.def(bp).config.max_retries.unwrap_or(1).max(1);
            record_failure(shared, job, &execution, true, &message)?;
            return queue_retry(shared, job, attempts, max, delay, &message, publisher);
        }
        Err(failure) => {
            return fail_node(shared, bp, job, &node, failure, execution, publisher)
                .map(Handled::from)
        }
    };
    // 4. Build the commit; 5–6 (commit, coordinate, publish, complete) follow in its tail.
    let executed = Executed {
        context: snapshot,
        success,
        execution,
    };
    build_commit(shared, bp, job, &node, executed, publisher)
}

/// A service failed: requeue the delivery (dead-lettered after repeated failures).
fn retry(what: &str, e: Error) -> Outcome {
    Outcome::Retry(format!("{what}: {e}"))
}

/// What the guard decided.
enum Guarded<'a> {
    /// Execute the node over this context.
    Execute {
        bp: &'a Blueprint,
        node: RunNode,
        context: ContextView,
    },
    /// Nothing to execute: settle the delivery.
    Settle(Outcome),
    /// Committed before: finish its coordination, with nothing to commit (decided from
    /// this context).
    Coordinate(Box<TailJob>, ContextView),
}

/// Step 2: whether the job is to be executed — its blueprint loaded, its run live and of
/// this blueprint version, its node known — and not executed before.
fn guard<'a>(
    shared: &'a Shared,
    job: &JobPayload,
    redelivered: bool,
    publisher: &mut dyn JobSink,
) -> Result<Guarded<'a>, Error> {
    use Guarded::{Coordinate, Settle};
    // The run, its blueprint, its version, the node. A message that cannot belong to any run
    // is dead-lettered: nothing is written for it. Only the keys the job is expected to read
    // are loaded; any other is fetched when read.
    let known = shared.blueprints.get(&job.blueprint_id);
    let loaded = match shared.read_ahead.take_for(job, redelivered) {
        Some((keys, snapshot)) => Some(view_of(&shared.store, &job.run_id, keys, snapshot)),
        None => keyed_view(
            &shared.store,
            &job.run_id,
            known.map(|bp| &**bp),
            &job.node_id,
        )?,
    };
    let Some((run_status, context)) = loaded else {
        let reason = format!("run '{}' does not exist (no context row)", job.run_id);
        return Ok(Settle(Outcome::DeadLetter(reason)));
    };
    let stamped = Blueprint::stamped_id(&context);
    if !stamped.is_empty() && stamped != job.blueprint_id {
        let reason = format!(
            "a job of blueprint '{}' for run '{}', which is a run of blueprint '{stamped}'",
            job.blueprint_id, job.run_id
        );
        return Ok(Settle(Outcome::DeadLetter(reason)));
    }
    let Some(bp) = known else {
        let reason = format!("unknown blueprint '{}'", job.blueprint_id);
        log::warn!("run {}: {reason}; marking it failed", job.run_id);
        pause::fail_run(shared, &job.run_id, Some(&context), &reason, publisher)?;
        return Ok(Settle(Outcome::Ack));
    };
    if let Some(status) = run_status.filter(|s| s.is_finished()) {
        if ParentLink::of(&context).is_some() {
            if let Some(whole) = shared.store.load(&job.run_id)? {
                pause::renotify_parent(shared, &job.run_id, &whole.context, status, publisher)?;
            }
        }
        log::debug!(
            "run {}: dropping job {} of a {status} run",
            job.run_id,
            job.node_id
        );
        return Ok(Settle(Outcome::Ack));
    }
    if let Some(reason) = version_mismatch(bp, &context) {
        return Ok(Settle(Outcome::DeadLetter(reason)));
    }
    let Some(node) = RunNode::resolve(bp, &context, &job.node_id) else {
        let gather = batch::gather_of(&job.node_id).and_then(|g| bp.node_index(g));
        if let Some(gather) = gather {
            // A worker job's iteration is its round's.
            if is_committed(bp, &RunNode::Static(gather), &context, job.iteration) {
                // A late copy of a batch worker of an earlier, larger round of a loop: that
                // round is gathered (the batch on record is a later one). Close it.
                return Ok(Coordinate(close_only(job), context));
            }
        }
        let reason = format!("node '{}' is not in blueprint '{}'", job.node_id, bp.id());
        if job.recovered {
            // The run's own records name it (the reconciler sent it): the run cannot go on.
            pause::fail_run(shared, &job.run_id, Some(&context), &reason, publisher)?;
            return Ok(Settle(Outcome::Ack));
        }
        // A stray message: it changes nothing.
        return Ok(Settle(Outcome::DeadLetter(reason)));
    };
    // Idempotency: a paused node.
    let paused = awaited_details(&context, &job.node_id).cloned();
    if let Some(details) = paused {
        let paused_iteration = paused_iteration(&details);
        if u64::from(job.iteration) > paused_iteration && !job.wake {
            // The next iteration of a pausing node arrived while the previous one is still
            // awaited: it must not be dropped, so it comes back in a second.
            return defer(shared, job, publisher).map(Settle);
        }
        if u64::from(job.iteration) == paused_iteration {
            if redelivered || job.wake {
                // The pause is committed; repeat what follows it (timer, child run): after
                // a crash, or when the reconciler found its wake-up lost.
                register_paused(shared, bp, job, &node)?;
                pause::after_commit(shared, job, node.def(bp), &details, publisher)?;
            }
            return Ok(Settle(Outcome::Ack));
        }
        // An earlier iteration: handled as any committed job below.
    }
    if job.wake {
        // The pause this wake-up was sent for is over: nothing to repeat.
        return Ok(Settle(Outcome::Ack));
    }
    // Idempotency: a committed node.
    if is_committed(bp, &node, &context, job.iteration) {
        // Committed before. Its coordination may not have happened (a crash, a failed step):
        // a redelivery, or the reconciler's copy, re-derives the successors. A plain
        // duplicate is dropped: the delivery that committed coordinates — or, if it dies
        // first, comes back redelivered. (Re-deriving here would publish the successors a
        // second time whenever a duplicate arrives while the original is coordinating.)
        if !redelivered && !job.recovered {
            return Ok(Settle(Outcome::Ack));
        }
        if executions(bp, &node, &context) == job.iteration.saturating_add(1) {
            let tail = rederive(bp, job, &node, &context);
            return Ok(Coordinate(tail, context));
        }
        // A later iteration of this node committed meanwhile (a side branch of a loop whose
        // jobs overtook each other): the stored successors are that iteration's, so only
        // close this job in the ledger.
        return Ok(Coordinate(close_only(job), context));
    }
    Ok(Guarded::Execute { bp, node, context })
}

/// Step 3: executes the node over the run's context, holding no connection; returns the
/// context (shared with the node's threads) and what the node did.
fn execute(
    shared: &Shared,
    bp: &Blueprint,
    job: &JobPayload,
    node: &RunNode,
    context: ContextView,
) -> (ContextView, Result<NodeSuccess, NodeFailure>, Execution) {
    // A run starts with its first start node's first attempt (not with its retries, nor
    // with the other start nodes running beside it).
    if is_start_job(bp, job, node)
        && job.attempt.unwrap_or(1) <= 1
        && bp.start_node_ids().first() == Some(&job.node_id.as_str())
    {
        log::info!("run {}: started ({})", job.run_id, bp.id());
        shared.metrics.runs.with_label_values(&["started"]).inc();
        shared
            .registry
            .events()
            .emit_with(|| FlowEvent::new(EventKind::WorkflowStart, &job.run_id, bp.id()));
    }
    let executing = shared.executing(&job.run_id);
    let node_job = NodeJob {
        blueprint: bp,
        node: node.def(bp),
        run_id: &job.run_id,
        run_cancel: Some(executing.cancel()),
        // Retries are queued, not waited for on this thread.
        queued_attempt: Some(job.attempt.unwrap_or(1).max(1)),
        lazy: context.lazy(),
    };
    let started_ms = now_ms() as f64;
    let started = std::time::Instant::now();
    let executed = execute_node(node_job, &shared.registry, context.snapshot().clone());
    shared
        .metrics
        .node_seconds
        .with_label_values(&[&node.def(bp).uses])
        .observe(started.elapsed().as_secs_f64());
    let execution = Execution {
        node_id: job.node_id.clone(),
        attempt: match &executed {
            Err(failure) => failure.attempts.max(1),
            Ok(_) => job.attempt.unwrap_or(1).max(1),
        },
        started_ms,
        finished_ms: started_ms + started.elapsed().as_secs_f64() * 1e3,
        worker: shared.worker_name.clone(),
    };
    (context, executed, execution)
}

/// A tail that only closes the job in the run's ledger (nothing to commit, no successors)
/// and completes the run if that was its last outstanding job.
fn close_only(job: &JobPayload) -> Box<TailJob> {
    TailJob::coordinate_only(job, &job.node_id, Vec::new(), Vec::new())
}

/// Queues the next attempt of a job whose attempt `attempt` failed, after `delay_ms` (its
/// node's `retryDelay`), and acks this delivery: no thread waits out the delay, and the
/// attempts are counted across deliveries (`attempt`, `isLastAttempt`, as Flowcraft 2.10's
/// queue-native retries).
fn queue_retry(
    shared: &Shared,
    job: &JobPayload,
    attempt: u32,
    max: u32,
    delay_ms: u64,
    reason: &str,
    publisher: &mut dyn JobSink,
) -> Result<Handled, Error> {
    let mut next = job.clone();
    next.attempt = Some(attempt + 1);
    next.is_last_attempt = Some(attempt + 1 >= max);
    log::info!(
        "run {}: '{}' attempt {attempt} failed ({reason}); attempt {} in {delay_ms} ms",
        job.run_id,
        job.node_id,
        attempt + 1
    );
    if delay_ms == 0 {
        publisher.publish_jobs("", &shared.queue, &[next.to_body()])?;
    } else {
        publisher.publish_delayed(&shared.queue, delay_ms, next.to_body(), delay_ms)?;
    }
    Ok(Outcome::Ack.into())
}

/// Puts a job back for a second, through the 1 s delay queue, and acks this delivery.
fn defer(shared: &Shared, job: &JobPayload, publisher: &mut dyn JobSink) -> Result<Outcome, Error> {
    const DEFER_MS: u64 = 1_000;
    publisher.publish_delayed(&shared.queue, DEFER_MS, job.to_body(), DEFER_MS)?;
    Ok(Outcome::Ack)
}

fn version_mismatch(bp: &Blueprint, context: &dyn ContextRead) -> Option<String> {
    let stored = context.get(BLUEPRINT_VERSION)?;
    let stored = match stored {
        Value::String(s) => s.clone(),
        Value::Null => return None,
        other => other.to_string(),
    };
    match bp.version() {
        Some(v) if v == stored => None,
        mine => Some(format!(
            "blueprint version mismatch: run has '{stored}', this worker has {}",
            mine.map(|v| format!("'{v}'"))
                .unwrap_or_else(|| "none".into())
        )),
    }
}

/// What step 3 left: the context the node read, what it did, and its history record.
struct Executed {
    context: ContextView,
    success: NodeSuccess,
    execution: Execution,
}

/// Step 4: what a node that executed writes — its output, bookkeeping, the successors it
/// chose and their inputs — as the tail that commits it; or, for a pausing node, its pause,
/// committed here (see [`pause`](super::pause)).
fn build_commit(
    shared: &Shared,
    bp: &Blueprint,
    job: &JobPayload,
    node: &RunNode,
    executed: Executed,
    publisher: &mut dyn JobSink,
) -> Result<Handled, Error> {
    let def = node.def(bp);
    let Executed {
        context,
        success,
        execution,
    } = executed;
    let NodeSuccess {
        result,
        deltas,
        fallback,
        ..
    } = success;
    let mut commit = NodeCommit::from_deltas(&deltas);
    commit.execution = shared.record_history.then_some(execution);
    if !context.has(BLUEPRINT_ID) {
        bp.stamp(&mut commit.set);
    }
    let guard = CommitGuard {
        output_key: output_key(&def.id),
        meta_key: meta_key(&def.id),
        iteration: job.iteration,
        repeats: node.may_repeat(bp),
    };
    if let Some(details) = result.awaiting.clone() {
        let details = match pause::prepare(shared, job, def, details)? {
            Prepared::Details(d) => d,
            Prepared::Fail(reason) => {
                pause::fail_run(shared, &job.run_id, Some(&context), &reason, publisher)?;
                return Ok(Outcome::Ack.into());
            }
        };
        commit.awaiting = Some((def.id.clone(), details.clone()));
        if !shared.store.commit_node(&job.run_id, commit, guard)? {
            // Committed already, or the node is paused at another iteration right now: try
            // again in a second (a copy of a committed pause is then dropped).
            return defer(shared, job, publisher).map(Handled::from);
        }
        // Registered before anything can resume it (a 0 ms timer, a fast child run).
        register_paused(shared, bp, job, node)?;
        pause::after_commit(shared, job, def, &details, publisher)?;
        log::info!("run {}: awaiting node '{}'", job.run_id, def.id);
        return Ok(Outcome::Ack.into());
    }
    // The context as the node left it, with its output recorded.
    let mut merged = context;
    merged.apply(&deltas);
    let mut outputs = ContextDeltas::default();
    match node {
        RunNode::Static(_) => {
            flow::record_output(&mut outputs, &def.id, fallback.as_deref(), &result.output)
        }
        RunNode::Dynamic(_) => flow::record_worker_output(&mut outputs, &def.id, &result.output),
    }
    merged.apply(&outputs);
    for (k, v) in outputs.iter() {
        commit
            .set
            .insert(k.to_string(), v.cloned().unwrap_or(Value::Null));
    }
    if guard.repeats {
        let previous_meta = merged.get(&guard.meta_key).cloned();
        let meta = scheduling::with_iteration(json!({}), previous_meta.as_ref(), job.iteration);
        merged.set(guard.meta_key.clone(), meta);
    }
    let next = next_jobs(
        bp,
        node,
        &result,
        fallback.as_deref(),
        &merged,
        job.iteration,
    );
    // The chosen successors are committed with the output, so a redelivery (or the frontier
    // of the reconciler) re-publishes exactly these, whatever the context has become since.
    // (Only where a re-derivation could choose differently: loops, actions, fallbacks and
    // conditions, and a successor that repeats, whose iteration counts its executions;
    // elsewhere the blueprint alone decides.)
    let context_decides = match node {
        // (A fallback target stores them so that the frontier can tell its own run from
        // its standing in for another node.)
        RunNode::Static(i) => {
            bp.has_conditional_successors(*i)
                || bp.node(*i).uses == flow::BATCH_SCATTER
                || !bp.fallback_of(*i).is_empty()
        }
        RunNode::Dynamic(_) => false,
    };
    let repeating_successor = next.iter().any(|n| {
        bp.node_index(&n.report.node)
            .is_some_and(|t| bp.may_repeat(t))
    });
    if guard.repeats
        || context_decides
        || repeating_successor
        || result.action.is_some()
        || fallback.is_some()
    {
        let reports: Vec<SuccessorReport> = next.iter().map(|n| n.report.clone()).collect();
        commit.set.insert(
            guard.meta_key.clone(),
            scheduling::node_meta(result.action.as_deref(), fallback.as_deref(), &reports),
        );
    }
    for n in &next {
        if let Some(input) = &n.input {
            let key = input_key(&n.report.node);
            commit.set_input(key, input.clone(), n.keeps_first_input(bp));
        }
    }
    if !guard.repeats && fallback.is_none() {
        commit.new_keys = keys_only_it_writes(bp, node, &commit);
    }
    // (Only a node that repeats counts its executions.)
    let over_limit = |n: &&scheduling::NextJob| {
        bp.node_index(&n.report.node)
            .is_some_and(|t| bp.may_repeat(t))
            && scheduling::execution_count(&merged, &n.report.node)
                >= shared.max_iterations as usize
    };
    if let Some(over) = next.iter().find(over_limit) {
        let reason = format!(
            "node '{}' exceeded the iteration limit ({} executions in one run)",
            over.report.node, shared.max_iterations
        );
        pause::fail_run(shared, &job.run_id, Some(&merged), &reason, publisher)?;
        return Ok(Outcome::Ack.into());
    }
    // What the successors this commit alone decides would load (read before the check
    // below: the header and awaiting keys are loaded, but a failed fetch must not go unseen).
    let derived = match node {
        RunNode::Static(from) if fallback.is_none() => next
            .iter()
            .filter_map(|n| read_ahead::derive(bp, *from, &job.run_id, &merged, &commit, n))
            .collect(),
        _ => Vec::new(),
    };
    check_reads(&merged)?;
    Ok(Handled::Tail(Box::new(TailJob {
        job: job.clone(),
        node_id: def.id.clone(),
        commit: Some((commit, guard)),
        also_register: ledger_jobs(bp, job, node),
        successors: next.into_iter().map(|n| n.report).collect(),
        derived,
    })))
}

/// The keys `commit`, of `node`, sets that no other commit of its run writes (see
/// [`NodeCommit::new_keys`]): its bare-id copy, and the inputs of successors that never
/// repeat, stand in for no node and have `node` as their only predecessor — where `node`
/// has no fallback (which takes over its edges) and is no node's fallback (whose stand-in
/// writes its keys). (The caller tells whether the node itself runs once and stands in for
/// no other node in this execution; its output is the guard's row.)
fn keys_only_it_writes(bp: &Blueprint, node: &RunNode, commit: &NodeCommit) -> Vec<String> {
    let RunNode::Static(from) = *node else {
        // (A batch worker writes its output only.)
        return Vec::new();
    };
    if bp.node(from).config.fallback.is_some() || !bp.fallback_of(from).is_empty() {
        return Vec::new();
    }
    let id = bp.node(from).id.as_str();
    let fed_by_it_alone = |key: &str| {
        let target = key
            .strip_prefix(INPUTS_PREFIX)
            .and_then(|t| bp.node_index(t));
        target.is_some_and(|t| bp.feeds_alone(from, t))
    };
    commit
        .set
        .keys()
        .filter(|key| key.as_str() == id || fed_by_it_alone(key))
        .cloned()
        .collect()
}

/// A redelivered job whose execution is committed: derive the successors again from the
/// stored result, as a tail with nothing to commit.
fn rederive(
    bp: &Blueprint,
    job: &JobPayload,
    node: &RunNode,
    context: &dyn ContextRead,
) -> Box<TailJob> {
    let def = node.def(bp);
    let (result, fallback) =
        scheduling::stored_result(context, &def.id).unwrap_or((NodeResult::default(), None));
    log::debug!(
        "run {}: redelivered '{}' is committed; re-deriving its successors",
        job.run_id,
        def.id
    );
    let reports = scheduling::stored_successors(context, &def.id).unwrap_or_else(|| {
        next_jobs(
            bp,
            node,
            &result,
            fallback.as_deref(),
            context,
            job.iteration,
        )
        .into_iter()
        .map(|n| n.report)
        .collect()
    });
    TailJob::coordinate_only(job, &def.id, ledger_jobs(bp, job, node), reports)
}

/// Whether `job` is one of the run's first jobs (a start node, before any loop).
fn is_start_job(bp: &Blueprint, job: &JobPayload, node: &RunNode) -> bool {
    job.iteration == 0 && matches!(node, RunNode::Static(i) if bp.start_nodes().contains(i))
}

/// The jobs the ledger must know when `job` finishes: itself, and the run's start jobs when
/// it is one of them.
fn ledger_jobs(bp: &Blueprint, job: &JobPayload, node: &RunNode) -> Vec<String> {
    if is_start_job(bp, job, node) {
        scheduling::start_jobs(bp)
    } else {
        Vec::new()
    }
}

/// A paused node's job stays outstanding in the ledger — registered, not done — until the
/// resume marks it done together with its successors, so the run never looks idle between
/// the resume's commit and its successors' registration.
fn register_paused(
    shared: &Shared,
    bp: &Blueprint,
    job: &JobPayload,
    node: &RunNode,
) -> Result<(), Error> {
    let mut jobs = ledger_jobs(bp, job, node);
    let starts = !jobs.is_empty();
    jobs.push(job_id(&job.node_id, job.iteration));
    if starts {
        shared.coord.register_start_jobs(&job.run_id, &jobs)?;
    } else {
        shared.coord.register_jobs(&job.run_id, &jobs)?;
    }
    Ok(())
}

/// A node failed for good: the run fails with the reason; its `all` successors get a poison
/// pill and its `any` successors a cancel pill, so nothing waits on it.
fn fail_node(
    shared: &Shared,
    bp: &Blueprint,
    job: &JobPayload,
    node: &RunNode,
    failure: NodeFailure,
    execution: Execution,
    publisher: &mut dyn JobSink,
) -> Result<Outcome, Error> {
    // A concurrent delivery of the same job may have succeeded meanwhile: its result stands.
    // (Read now, and only the keys this reads: the node's records, the run's parent.)
    let now = keyed_view(&shared.store, &job.run_id, Some(bp), &job.node_id)?;
    if let Some((_, now)) = &now {
        if is_committed(bp, node, now, job.iteration) {
            log::info!(
                "run {}: '{}' failed here ({failure}) but another delivery committed it",
                job.run_id,
                node.def(bp).id
            );
            return Ok(Outcome::Ack);
        }
    }
    record_failure(shared, job, &execution, false, &failure.message)?;
    if let RunNode::Static(i) = node {
        let (mut poisoned, mut cancelled) = (Vec::new(), Vec::new());
        for &e in bp.outgoing(*i) {
            let target = bp.edge_ends(e).1;
            let id = bp.node(target).id.clone();
            match bp.join_strategy(target) {
                JoinStrategy::All => poisoned.push(id),
                JoinStrategy::Any => cancelled.push(id),
            }
        }
        shared.coord.poison(&job.run_id, &poisoned, &cancelled)?;
    }
    let context = now.as_ref().map(|(_, now)| now as &dyn ContextRead);
    pause::fail_run(
        shared,
        &job.run_id,
        context,
        &failure.to_string(),
        publisher,
    )?;
    Ok(Outcome::Ack)
}

/// Records a failed attempt in the run history (retried, or failing the node for good),
/// unless the worker keeps no history.
fn record_failure(
    shared: &Shared,
    job: &JobPayload,
    execution: &Execution,
    retried: bool,
    message: &str,
) -> Result<(), Error> {
    if shared.record_history {
        shared
            .store
            .record_failure(&job.run_id, job.iteration, execution, retried, message)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::blueprint::NodeDef;
    use std::sync::Arc;

    /// A chain `a → b`, a join `a, x → j`, a loop `a → l → l`, and `a → f`, where `f` is
    /// also `x`'s fallback.
    fn blueprint() -> Blueprint {
        Blueprint::from_json(
            r#"{"id":"d","nodes":[
                {"id":"a","uses":"t"},{"id":"b","uses":"t"},
                {"id":"x","uses":"t","config":{"fallback":"f"}},
                {"id":"j","uses":"t"},{"id":"l","uses":"t"},{"id":"f","uses":"t"}],
              "edges":[{"source":"a","target":"b"},{"source":"a","target":"j"},
                {"source":"x","target":"j"},{"source":"a","target":"l"},
                {"source":"l","target":"l"},{"source":"a","target":"f"}]}"#,
        )
        .expect("blueprint")
    }

    fn commit_setting(keys: &[&str]) -> NodeCommit {
        let mut commit = NodeCommit::default();
        for key in keys {
            commit.set.insert(key.to_string(), json!(1));
        }
        commit
    }

    #[test]
    fn the_keys_only_a_commit_writes_are_its_bare_copy_and_inputs_it_alone_feeds() {
        let bp = blueprint();
        let a = RunNode::Static(bp.node_index("a").expect("a"));
        let keys = [
            "_outputs.a",
            "a",
            "_inputs.b",
            // The input of a join, of a node that repeats, of another node's fallback.
            "_inputs.j",
            "_inputs.l",
            "_inputs.f",
            // A key of the node's own, another node's output and bare key.
            "total",
            "_outputs.b",
            "b",
        ];
        let mut new_keys = keys_only_it_writes(&bp, &a, &commit_setting(&keys));
        new_keys.sort();
        assert_eq!(new_keys, vec!["_inputs.b".to_string(), "a".to_string()]);
        // A node with a fallback (which takes over its edges), a node's fallback (whose
        // stand-in writes its keys): none.
        for (id, input) in [("x", "_inputs.j"), ("f", "_inputs.b")] {
            let n = RunNode::Static(bp.node_index(id).expect("node"));
            let commit = commit_setting(&[id, input]);
            assert!(keys_only_it_writes(&bp, &n, &commit).is_empty(), "{id}");
        }
        // A batch worker writes its output only.
        let def: NodeDef = serde_json::from_value(json!({"id": "w_1", "uses": "t"})).expect("def");
        let worker = RunNode::Dynamic(Arc::new(def));
        let commit = commit_setting(&["_outputs.w_1", "w_1", "_inputs.b"]);
        assert!(keys_only_it_writes(&bp, &worker, &commit).is_empty());
    }
}
