//! Pausing nodes in the distributed runtime, and what wakes them.
//!
//! - `wait`: nothing to do; a person resumes the run (`Client::resume_with_action`).
//! - `sleep`: after the commit, a timer message goes to the delay queue of its duration
//!   (`<queue>.delay.<ms>`) and dead-letters into the job queue at `wakeUpAt`; whichever
//!   worker receives it resumes the node. Nothing holds a thread, and the timer survives
//!   worker restarts.
//! - `webhook`: before the commit, the endpoint is registered (`{url, event}` in the
//!   details); the receiver publishes the call to the events exchange, bound to the job
//!   queue, and a worker resumes the node with the payload.
//! - `subflow`: after the commit, the child run is created (idempotently, with a
//!   deterministic id) and its start jobs published; when the child completes, the parent
//!   node is resumed with its result; when it fails, the parent node retries (a new child
//!   run), falls back, or fails.
//!
//! Every step is idempotent: a redelivered pausing job repeats `after_commit`, and resumes
//! are guarded by the awaiting keys.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::engine::blueprint::{Blueprint, NodeDef};
use crate::engine::events::FlowEvent;
use crate::engine::executor::{run_fallback, NodeFailure, NodeJob, NodeSuccess};
use crate::engine::node::{ContextMap, ContextRead, ContextView, NodeResult};
use crate::engine::nodes::{now_ms, subflow};
use crate::runtime::message::{EventMessage, JobPayload};
use crate::runtime::resumer::ParentLink;
use crate::runtime::scheduling::{awaited_details, paused_iteration};
use crate::services::rabbitmq::JobSink;
use crate::vocabulary::keys::{input_key, output_key, BLUEPRINT_ID, PARENT_KEY};
use crate::vocabulary::limits::MAX_ID_BYTES;
use crate::vocabulary::RunStatus;

use super::consumer::Outcome;
use super::shared::Shared;
use crate::runtime::error::Error;
use crate::runtime::reads::{check_reads, keyed_view};

/// What a pausing node's details become before the commit.
pub(crate) enum Prepared {
    Details(Value),
    /// The node cannot pause (e.g. a subflow of an unknown blueprint): the run fails.
    Fail(String),
}

fn kind(details: &Value) -> &str {
    details
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Completes a pausing node's `_awaitingDetails` entry before it is committed (with the
/// loop iteration it pauses at).
pub(crate) fn prepare(
    shared: &Shared,
    job: &JobPayload,
    node: &NodeDef,
    mut details: Value,
) -> Result<Prepared, Error> {
    match kind(&details) {
        "webhook" => {
            let endpoint = crate::runtime::webhook::register_endpoint(
                &shared.store,
                &shared.public_url,
                &job.run_id,
                &node.id,
            )?;
            details["url"] = Value::String(endpoint.url);
            details["event"] = Value::String(endpoint.event);
        }
        "subflow" => {
            let child = details["blueprintId"].as_str().unwrap_or_default();
            if !shared.blueprints.contains_key(child) {
                return Ok(Prepared::Fail(format!(
                    "subflow node '{}' names blueprint '{child}', which this worker does not have",
                    node.id
                )));
            }
            details["attempt"] = json!(1);
            details["childRunId"] = json!(child_run_id(&job.run_id, &node.id, job.iteration, 1));
        }
        _ => {}
    }
    if let Some(d) = details.as_object_mut() {
        d.insert("iteration".into(), json!(job.iteration));
    }
    Ok(Prepared::Details(details))
}

fn child_run_id(parent: &str, node: &str, iteration: u32, attempt: u32) -> String {
    let id = format!("{parent}.{node}.{iteration}.{attempt}");
    if id.len() <= MAX_ID_BYTES {
        return id;
    }
    // Too long for a job message (nested subflows, long ids): the same id, as a digest.
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("child-{hex}")
}

/// Runs after a pausing node's commit (and again when its job is redelivered).
pub(crate) fn after_commit(
    shared: &Shared,
    job: &JobPayload,
    node: &NodeDef,
    details: &Value,
    publisher: &mut dyn JobSink,
) -> Result<(), Error> {
    match kind(details) {
        "sleep" => {
            arm_timer(shared, job, node, details, publisher)?;
            log::info!(
                "run {}: '{}' sleeps until {}",
                job.run_id,
                node.id,
                details["wakeUpAt"]
            );
        }
        "subflow" => start_child(shared, job, node, details, publisher)?,
        _ => {}
    }
    Ok(())
}

/// Longest single hop of a timer; longer sleeps re-arm when the hop ends.
const MAX_TIMER_HOP_MS: u64 = 20 * 24 * 3600 * 1000;

/// Publishes a sleep's wake-up: to the delay queue of its duration, expiring at `wakeUpAt`
/// (or at the end of the hop, for sleeps over 20 days), or straight to the job queue when
/// the time has come.
fn arm_timer(
    shared: &Shared,
    job: &JobPayload,
    node: &NodeDef,
    details: &Value,
    publisher: &mut dyn JobSink,
) -> Result<(), Error> {
    let duration = details["durationMs"].as_u64().unwrap_or(0);
    let wake_at = details["wakeUpAtMs"].as_u64().unwrap_or(0);
    let remaining = wake_at.saturating_sub(now_ms());
    let mut timer = JobPayload::new(&job.run_id, &job.blueprint_id, &node.id, job.iteration);
    timer.timer = true;
    if remaining == 0 {
        return Ok(publisher.publish_jobs("", &shared.queue, &[timer.to_body()])?);
    }
    let hop = remaining.min(MAX_TIMER_HOP_MS);
    // A first arming shares the queue of its duration (all its messages expire in publish
    // order). A re-arming (a redelivered pause, the next hop of a long sleep) has less time
    // left than its duration, so it goes to a queue of its own rounded hop instead of waiting
    // behind longer timers.
    let first_arm = duration.saturating_sub(remaining) < 1_000;
    let queue_ms = if first_arm {
        duration.clamp(hop, MAX_TIMER_HOP_MS)
    } else {
        hop.div_ceil(1_000) * 1_000
    };
    Ok(publisher.publish_delayed(&shared.queue, queue_ms, timer.to_body(), hop)?)
}

fn start_child(
    shared: &Shared,
    job: &JobPayload,
    node: &NodeDef,
    details: &Value,
    publisher: &mut dyn JobSink,
) -> Result<(), Error> {
    let child_id = details["blueprintId"].as_str().unwrap_or_default();
    let Some(child) = shared.blueprints.get(child_id) else {
        // The pause was committed by a worker that has this blueprint; one that does
        // will start the child.
        log::warn!(
            "run {}: cannot start the child of '{}': blueprint '{child_id}' is not loaded here",
            job.run_id,
            node.id
        );
        return Ok(());
    };
    let child_run = details["childRunId"].as_str().unwrap_or_default();
    let mut context = subflow::child_initial_context(details, child);
    child.stamp(&mut context);
    context.insert(
        PARENT_KEY.into(),
        json!({"runId": job.run_id, "nodeId": node.id, "blueprintId": job.blueprint_id}),
    );
    shared.store.create_run_if_absent(child_run, &context)?;
    // The parent may have been cancelled between its pause and now: then so is the child.
    let parent = shared.store.status(&job.run_id)?;
    if parent.is_some_and(|p| p.status == RunStatus::Cancelled) {
        shared.store.cancel_run(child_run)?;
        return Ok(());
    }
    let bodies: Vec<Vec<u8>> = child
        .start_node_ids()
        .iter()
        .map(|s| JobPayload::new(child_run, child.id(), s, 0).to_body())
        .collect();
    publisher.publish_jobs("", &shared.queue, &bodies)?;
    log::info!(
        "run {}: subflow '{}' started child run {child_run} ({child_id})",
        job.run_id,
        node.id
    );
    Ok(())
}

/// Resumes one awaited node; a node no longer awaited (resumed already, or the run ended)
/// is not an error.
fn resume_node(
    shared: &Shared,
    run: &str,
    (status, context): (Option<RunStatus>, ContextView),
    node: &str,
    success: NodeSuccess,
    publisher: &mut dyn JobSink,
) -> Result<Outcome, Error> {
    let nodes = [node.to_string()];
    match shared
        .resumer()
        .resume_view(run, status, context, Some(&nodes), success, publisher)
    {
        Ok(_) => Ok(Outcome::Ack),
        Err(e) if !e.is_refusal() => Err(e),
        Err(other) => {
            log::debug!("run {run}: '{node}' not resumed: {other}");
            Ok(Outcome::Ack)
        }
    }
}

/// A `sleep` node's timer fired.
pub(crate) fn on_timer(
    shared: &Shared,
    job: &JobPayload,
    publisher: &mut dyn JobSink,
) -> Result<Outcome, Error> {
    // The keys the wake-up reads, not the whole run.
    let bp = shared.blueprints.get(&job.blueprint_id).map(|bp| &**bp);
    let Some(run) = keyed_view(&shared.store, &job.run_id, bp, &job.node_id)? else {
        return Ok(Outcome::DeadLetter(format!(
            "timer for unknown run '{}'",
            job.run_id
        )));
    };
    let Some(details) = awaited_details(&run.1, &job.node_id).cloned() else {
        return Ok(Outcome::Ack);
    };
    if kind(&details) != "sleep" || paused_iteration(&details) != u64::from(job.iteration) {
        // A stale timer (an earlier iteration, or the node is not a sleep): nothing to do.
        return Ok(Outcome::Ack);
    }
    if details["wakeUpAtMs"].as_u64().unwrap_or(0) > now_ms() + 50 {
        // One hop of a long sleep ended: arm the next.
        if let Some(node) = shared
            .blueprints
            .get(&job.blueprint_id)
            .and_then(|bp| bp.node_by_id(&job.node_id))
        {
            arm_timer(shared, job, node, &details, publisher)?;
        }
        return Ok(Outcome::Ack);
    }
    // A sleep passes its input through.
    let output = run
        .1
        .get(&input_key(&job.node_id))
        .cloned()
        .unwrap_or(Value::Null);
    log::info!("run {}: '{}' wakes up", job.run_id, job.node_id);
    let success = NodeSuccess::of(NodeResult::output(output));
    resume_node(shared, &job.run_id, run, &job.node_id, success, publisher)
}

/// A webhook was called.
pub(crate) fn on_event(
    shared: &Shared,
    event: &EventMessage,
    publisher: &mut dyn JobSink,
) -> Result<Outcome, Error> {
    let Some((run, node)) = event.webhook_target() else {
        return Ok(Outcome::DeadLetter(format!(
            "event '{}' names no run and node",
            event.event
        )));
    };
    log::info!("run {run}: webhook '{node}' called");
    // The payload must not vanish: an event no awaited webhook node takes is dead-lettered.
    // The keys the resume reads, not the whole run (the event names no blueprint: the rest
    // is fetched when read).
    let Some(view) = keyed_view(&shared.store, &run, None, &node)? else {
        return Ok(Outcome::DeadLetter(format!(
            "webhook event for unknown run '{run}'"
        )));
    };
    let awaited_iteration = awaited_details(&view.1, &node)
        .filter(|d| kind(d) == "webhook")
        .map(paused_iteration);
    let fresh = match (awaited_iteration, event.iteration) {
        (Some(awaited), Some(sent)) => awaited == u64::from(sent),
        (Some(awaited), None) => awaited == 0,
        (None, _) => false,
    };
    if !fresh {
        if view.1.has(&output_key(&node)) {
            // A repeat of an event already applied (a redelivery after the resume).
            return Ok(Outcome::Ack);
        }
        return Ok(Outcome::DeadLetter(format!(
            "webhook event for run '{run}', whose node '{node}' is not an awaited webhook"
        )));
    }
    let success = NodeSuccess::of(NodeResult::output(event.payload.clone()));
    resume_node(shared, &run, view, &node, success, publisher)
}

/// A step of `job` failed on data PostgreSQL refuses ([`Error::is_permanent`]): retrying
/// would fail the same way, so the run fails with PostgreSQL's reason.
pub(crate) fn fail_on_refused_data(
    shared: &Shared,
    job: &JobPayload,
    e: &Error,
    publisher: &mut dyn JobSink,
) -> Result<(), Error> {
    let reason = format!("{}: {e}", job.describe());
    log::warn!("{reason}; failing the run");
    fail_run(shared, &job.run_id, None, &reason, publisher)
}

/// Marks a run failed; if it is a subflow's child, the parent node retries it (a new child
/// run, while `maxRetries` allows), runs its fallback, or fails too.
///
/// `context` is the run's context if the caller has read it (it tells whether the run is a
/// subflow's child); without it, the run is read.
pub(crate) fn fail_run(
    shared: &Shared,
    run: &str,
    context: Option<&dyn ContextRead>,
    reason: &str,
    publisher: &mut dyn JobSink,
) -> Result<(), Error> {
    if !shared.store.fail_run(run, reason)? {
        return Ok(());
    }
    log::info!("run {run}: failed: {reason}");
    shared.metrics.runs.with_label_values(&["failed"]).inc();
    shared.registry.events().emit_with(|| {
        let blueprint = context.and_then(|c| c.get(BLUEPRINT_ID));
        let blueprint = blueprint.and_then(Value::as_str).unwrap_or_default();
        FlowEvent::workflow_finish(run, blueprint, RunStatus::Failed.as_str(), Some(reason))
    });
    propagate_failure(shared, run, context, reason, publisher)
}

/// Tells a failed child's parent, if it still awaits this child (`context` as in
/// [`fail_run`]).
fn propagate_failure(
    shared: &Shared,
    run: &str,
    context: Option<&dyn ContextRead>,
    reason: &str,
    publisher: &mut dyn JobSink,
) -> Result<(), Error> {
    let link = match context {
        Some(context) => ParentLink::of(context),
        None => shared
            .store
            .load(run)?
            .and_then(|child| ParentLink::of(&child.context)),
    };
    let Some(link) = link else {
        return Ok(());
    };
    let Some((status, parent, details)) = link.awaiting_parent(&shared.store, run)? else {
        return Ok(());
    };
    match child_failed(
        shared,
        &link,
        (status, parent),
        run,
        reason,
        details,
        publisher,
    )? {
        None => Ok(()),
        Some(parent_reason) => fail_run(shared, &link.run_id, None, &parent_reason, publisher),
    }
}

/// A job arrived for a child run that already ended: if its parent still awaits it, the
/// notification was lost (an error or a crash right after the child ended) — do it again.
pub(crate) fn renotify_parent(
    shared: &Shared,
    run: &str,
    context: &ContextMap,
    status: RunStatus,
    publisher: &mut dyn JobSink,
) -> Result<(), Error> {
    match status {
        RunStatus::Completed => shared.resumer().resume_parent(run, context, publisher),
        RunStatus::Failed => {
            let reason = shared
                .store
                .status(run)?
                .and_then(|row| row.reason().map(String::from))
                .unwrap_or_else(|| "the child run failed".into());
            propagate_failure(shared, run, Some(context), &reason, publisher)
        }
        _ => Ok(()),
    }
}

/// The parent's answer to a failed child: `None` when handled (retry or fallback), or the
/// reason the parent run fails.
#[allow(clippy::too_many_arguments)]
fn child_failed(
    shared: &Shared,
    link: &ParentLink,
    (status, parent): (Option<RunStatus>, ContextView),
    child_run: &str,
    child_reason: &str,
    details: Value,
    publisher: &mut dyn JobSink,
) -> Result<Option<String>, Error> {
    let Some(bp) = shared.blueprints.get(Blueprint::stamped_id(&parent)) else {
        return Ok(None);
    };
    let Some(node) = bp.node_by_id(&link.node_id) else {
        return Ok(None);
    };
    let message = format!(
        "subflow '{}' (run {child_run}) failed: {child_reason}",
        details["blueprintId"].as_str().unwrap_or_default()
    );
    let attempt = details["attempt"].as_u64().unwrap_or(1) as u32;
    if attempt < node.config.max_retries.unwrap_or(1) {
        let iteration = paused_iteration(&details) as u32;
        let mut next = details.clone();
        next["attempt"] = json!(attempt + 1);
        next["childRunId"] = json!(child_run_id(&link.run_id, &node.id, iteration, attempt + 1));
        if shared
            .store
            .update_awaiting_details(&link.run_id, &node.id, &next)?
        {
            log::info!(
                "run {}: retrying subflow '{}' (attempt {})",
                link.run_id,
                node.id,
                attempt + 1
            );
            let job = JobPayload::new(&link.run_id, bp.id(), &node.id, iteration);
            start_child(shared, &job, node, &next, publisher)?;
        }
        return Ok(None);
    }
    let failure = NodeFailure {
        node_id: node.id.clone(),
        message: message.clone(),
        fatal: false,
        attempts: attempt,
        retry_after_ms: None,
    };
    let job = NodeJob {
        blueprint: bp,
        node,
        run_id: &link.run_id,
        run_cancel: None,
        queued_attempt: None,
        lazy: parent.lazy(),
    };
    let outcome = run_fallback(job, &shared.registry, parent.snapshot().clone(), failure);
    check_reads(&parent)?;
    match outcome {
        Ok(success) => {
            let parent = (status, parent);
            resume_node(shared, &link.run_id, parent, &node.id, success, publisher)?;
            Ok(None)
        }
        Err(failure) if failure.node_id == node.id => Ok(Some(format!(
            "node '{}' failed: {}",
            node.id, failure.message
        ))),
        Err(failure) => Ok(Some(format!(
            "{failure} (fallback of '{}' after: {message})",
            node.id
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::child_run_id;
    use crate::vocabulary::limits::{check_id, MAX_ID_BYTES};

    #[test]
    fn a_child_run_id_fits_a_job_message_however_deep_the_nesting() {
        assert_eq!(child_run_id("r", "sub", 0, 1), "r.sub.0.1");
        let long_parent = "p".repeat(MAX_ID_BYTES);
        let id = child_run_id(&long_parent, "sub", 3, 2);
        assert!(check_id("the child run id", &id).is_ok(), "{id}");
        // Deterministic (the child is created idempotently), and distinct per attempt.
        assert_eq!(id, child_run_id(&long_parent, "sub", 3, 2));
        assert_ne!(id, child_run_id(&long_parent, "sub", 3, 3));
    }
}
