//! Executing one node of one run: input resolution, attempts, timeouts and fallback.
//!
//! [`execute_node`] is the single entry point used by the in-process runner and by the
//! distributed worker alike. It needs no database: it takes a context snapshot and returns
//! the node's [`NodeResult`] together with the context writes to persist. It never holds a
//! connection while node code runs, because it has none.
//!
//! Rules (SPEC §2–§3): up to `config.maxRetries` attempts (default 1) with `retryDelay` ms
//! between them; an attempt over `timeout` ms is abandoned on its thread, its cancellation
//! flag raised, and counts as failed; after the last failed attempt the `fallback` node runs
//! with `_catch_error` set, and its result stands in; a fatal error skips both.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::engine::blueprint::{Blueprint, NodeDef, NodeInputs};
use crate::engine::events::{EventKind, FlowEvent};
use crate::engine::node::{
    CancelFlag, ContextDeltas, ContextMap, ContextView, LazyKeys, Node, NodeContext, NodeError,
    NodeResult,
};
use crate::engine::registry::NodeRegistry;
use crate::vocabulary::keys::{INPUTS_PREFIX, OUTPUTS_PREFIX};
use crate::vocabulary::limits::check_storable;

/// Fallbacks may themselves have fallbacks; this bounds the chain.
const MAX_FALLBACK_DEPTH: usize = 8;

/// A node executed successfully (possibly through its fallback).
#[derive(Debug, Clone)]
pub struct NodeSuccess {
    /// The node's output and action (the fallback's, when `fallback` is set).
    pub result: NodeResult,
    /// The node's own context writes (plus `_catch_error` when the fallback ran).
    pub deltas: ContextDeltas,
    /// Id of the fallback node whose result stands in, if any.
    pub fallback: Option<String>,
    /// Attempts made by the node itself.
    pub attempts: u32,
}

impl NodeSuccess {
    /// A result that stands as it is: no context writes, no fallback (a resumed pause).
    pub fn of(result: NodeResult) -> NodeSuccess {
        NodeSuccess {
            result,
            deltas: ContextDeltas::default(),
            fallback: None,
            attempts: 1,
        }
    }
}

/// A node failed for good.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFailure {
    /// Id of the node that failed (the fallback's, when the fallback failed too).
    pub node_id: String,
    /// The last attempt's error message (or why no attempt could run).
    pub message: String,
    /// Whether the error was fatal, so retries and the fallback were skipped.
    pub fatal: bool,
    /// Attempts made (0 when no implementation is registered for the node's `uses`).
    pub attempts: u32,
    /// Set when the job ran one queued attempt ([`NodeJob::queued_attempt`]) that failed
    /// and attempts are left: the caller queues the next one after this many milliseconds
    /// (the node's `retryDelay`); no fallback ran.
    pub retry_after_ms: Option<u64>,
}

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node '{}' failed after {} attempt(s): {}",
            self.node_id, self.attempts, self.message
        )
    }
}

/// What to execute.
#[derive(Debug, Clone, Copy)]
pub struct NodeJob<'a> {
    /// The run's blueprint (fallback nodes are looked up in it).
    pub blueprint: &'a Blueprint,
    /// The node definition (a blueprint node, or a dynamic node built at run time).
    pub node: &'a NodeDef,
    /// Id of the run the node executes in.
    pub run_id: &'a str,
    /// The run's cancellation: raised, it raises the running attempt's flag, and no further
    /// attempt or fallback starts. `None`: the run is not cancelled from outside.
    pub run_cancel: Option<&'a CancelFlag>,
    /// Queue-native retries (the distributed worker): run only this attempt (1-based); if it
    /// fails with attempts left, the failure says when to queue the next
    /// ([`NodeFailure::retry_after_ms`]) instead of waiting here. `None`: every attempt
    /// runs here, with `retryDelay` between them (the in-process runner).
    pub queued_attempt: Option<u32>,
    /// The keys the snapshot lacks, fetched on first read (the distributed worker, whose
    /// snapshot holds only what the job was expected to read). `None`: the snapshot is the
    /// whole context.
    pub lazy: Option<&'a Arc<LazyKeys>>,
}

impl NodeJob<'_> {
    fn cancelled(&self) -> bool {
        self.run_cancel.is_some_and(CancelFlag::is_cancelled)
    }
}

/// The failure message of a node whose run was cancelled while it ran.
pub const CANCELLED: &str = "the run was cancelled";

/// Executes a node against a context snapshot.
pub fn execute_node(
    job: NodeJob<'_>,
    registry: &NodeRegistry,
    snapshot: Arc<ContextMap>,
) -> Result<NodeSuccess, NodeFailure> {
    execute_with_fallback(job, registry, snapshot, ContextDeltas::default(), 0)
}

fn execute_with_fallback(
    job: NodeJob<'_>,
    registry: &NodeRegistry,
    snapshot: Arc<ContextMap>,
    inherited: ContextDeltas,
    depth: usize,
) -> Result<NodeSuccess, NodeFailure> {
    let failure = match run_attempts(job, registry, &snapshot, &inherited) {
        Ok(success) => return Ok(success),
        Err(failure) => failure,
    };
    fallback_after(job, registry, snapshot, inherited, depth, failure)
}

/// Runs `job`'s fallback for a failure of its own that happened elsewhere (a subflow whose
/// child run failed): `_catch_error` set, as when its attempts fail here. Without a
/// fallback (or for a fatal failure) the failure stands.
pub fn run_fallback(
    job: NodeJob<'_>,
    registry: &NodeRegistry,
    snapshot: Arc<ContextMap>,
    failure: NodeFailure,
) -> Result<NodeSuccess, NodeFailure> {
    fallback_after(
        job,
        registry,
        snapshot,
        ContextDeltas::default(),
        0,
        failure,
    )
}

fn fallback_after(
    job: NodeJob<'_>,
    registry: &NodeRegistry,
    snapshot: Arc<ContextMap>,
    inherited: ContextDeltas,
    depth: usize,
    failure: NodeFailure,
) -> Result<NodeSuccess, NodeFailure> {
    let fallback_id = match &job.node.config.fallback {
        Some(f) if !failure.fatal && !job.cancelled() && failure.retry_after_ms.is_none() => f,
        _ => return Err(failure),
    };
    let fallback = match job.blueprint.node_by_id(fallback_id) {
        Some(f) if depth < MAX_FALLBACK_DEPTH => f,
        _ => return Err(failure),
    };
    log::info!(
        "run {}: node '{}' failed ({}); running fallback '{}'",
        job.run_id,
        job.node.id,
        failure.message,
        fallback_id
    );
    let mut deltas = inherited;
    deltas.set(
        "_catch_error",
        json!({"message": failure.message, "nodeId": job.node.id, "blueprintId": job.blueprint.id()}),
    );
    // A fallback runs its own attempts here, whatever the failed node's retries were.
    let fallback_job = NodeJob {
        node: fallback,
        queued_attempt: None,
        ..job
    };
    let mut success = execute_with_fallback(fallback_job, registry, snapshot, deltas, depth + 1)?;
    success.fallback = Some(
        success
            .fallback
            .take()
            .unwrap_or_else(|| fallback.id.clone()),
    );
    success.attempts = failure.attempts;
    Ok(success)
}

fn run_attempts(
    job: NodeJob<'_>,
    registry: &NodeRegistry,
    snapshot: &Arc<ContextMap>,
    inherited: &ContextDeltas,
) -> Result<NodeSuccess, NodeFailure> {
    let node = job.node;
    let fail = |message: String, fatal: bool, attempts: u32| NodeFailure {
        node_id: node.id.clone(),
        message,
        fatal,
        attempts,
        retry_after_ms: None,
    };
    let implementation = registry.get(&node.uses).ok_or_else(|| {
        fail(
            format!("no implementation is registered for uses '{}'", node.uses),
            true,
            0,
        )
    })?;
    let max_attempts = node.config.max_retries.unwrap_or(1).max(1);
    let timeout = node.config.timeout.map(Duration::from_millis);
    let mut last_error = NodeError::new("not attempted");
    let attempts = match job.queued_attempt {
        Some(k) => k.clamp(1, max_attempts)..=k.clamp(1, max_attempts),
        None => 1..=max_attempts,
    };
    for attempt in attempts.clone() {
        if job.cancelled() {
            return Err(fail(CANCELLED.into(), true, attempt - 1));
        }
        let mut view = ContextView::with_lazy(snapshot.clone(), job.lazy.cloned());
        for (k, v) in inherited.iter() {
            match v {
                Some(v) => view.set(k, v.clone()),
                None => view.delete(k),
            }
        }
        let ctx = NodeContext {
            input: resolve_input(node, &view),
            params: node.params.clone(),
            context: view,
            run_id: job.run_id.to_string(),
            node_id: node.id.clone(),
            blueprint_id: job.blueprint.id().to_string(),
            attempt,
            cancel: job
                .run_cancel
                .map_or_else(CancelFlag::new, CancelFlag::child),
        };
        // Lifecycle events (built only when somebody listens).
        let started = std::time::Instant::now();
        let emit = |kind: EventKind, error: Option<&str>| {
            registry.events().emit_with(|| {
                let mut event =
                    FlowEvent::new(kind, job.run_id, job.blueprint.id()).node(&node.id, attempt);
                if kind != EventKind::NodeStart {
                    event.duration = Some(started.elapsed());
                }
                event.error = error.map(String::from);
                event
            })
        };
        emit(EventKind::NodeStart, None);
        let failed = |error: &str, last: bool| {
            let kind = if last {
                EventKind::NodeError
            } else {
                EventKind::NodeRetry
            };
            emit(kind, Some(error));
        };
        match run_attempt(implementation.clone(), ctx, timeout) {
            // A result that cannot be stored fails the attempt, in both runtimes alike (so a
            // blueprint means the same in process as distributed): retries and the fallback
            // apply as to any failure.
            Ok((result, deltas)) => match check_result(&result, &deltas) {
                Ok(()) => {
                    emit(EventKind::NodeFinish, None);
                    match node.uses.as_str() {
                        crate::engine::flow::BATCH_SCATTER => emit(EventKind::BatchStart, None),
                        crate::engine::flow::BATCH_GATHER => emit(EventKind::BatchFinish, None),
                        _ => {}
                    }
                    return Ok(NodeSuccess {
                        result,
                        deltas,
                        fallback: None,
                        attempts: attempt,
                    });
                }
                Err(problem) => {
                    log::debug!(
                        "run {}: node '{}' attempt {attempt}/{max_attempts}: {problem}",
                        job.run_id,
                        node.id
                    );
                    failed(&problem, attempt >= max_attempts);
                    last_error = NodeError::new(problem);
                }
            },
            Err(e) if e.is_fatal() => {
                failed(e.message(), true);
                return Err(fail(e.message().to_string(), true, attempt));
            }
            Err(e) => {
                log::debug!(
                    "run {}: node '{}' attempt {attempt}/{max_attempts} failed: {e}",
                    job.run_id,
                    node.id
                );
                failed(e.message(), attempt >= max_attempts);
                last_error = e;
            }
        }
        if job.queued_attempt.is_some() && attempt < max_attempts {
            // The caller queues the next attempt.
            let mut failure = fail(last_error.message().to_string(), false, attempt);
            failure.retry_after_ms = Some(node.config.retry_delay.unwrap_or(0));
            return Err(failure);
        }
        if attempt < max_attempts {
            if let Some(delay) = node.config.retry_delay.filter(|&d| d > 0) {
                // In steps, so that a cancelled run does not wait out the delay.
                let until = std::time::Instant::now() + Duration::from_millis(delay);
                while !job.cancelled() {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    std::thread::sleep(left.min(Duration::from_millis(50)));
                }
            }
        }
    }
    Err(fail(
        last_error.message().to_string(),
        false,
        *attempts.end(),
    ))
}

/// Whether a node's result and writes can be stored and read back (see
/// [`limits`](crate::vocabulary::limits)): the reason when not.
fn check_result(result: &NodeResult, deltas: &ContextDeltas) -> Result<(), String> {
    let mut spent = check_storable("its output", &result.output, 0)?;
    if let Some(action) = &result.action {
        spent = check_storable("its action", &Value::String(action.clone()), spent)?;
    }
    if let Some(details) = &result.awaiting {
        spent = check_storable("its pause", details, spent)?;
    }
    for (key, value) in deltas.iter() {
        spent = check_storable(
            "a context key it wrote",
            &Value::String(key.to_string()),
            spent,
        )?;
        if let Some(value) = value {
            spent = check_storable(&format!("context key '{key}'"), value, spent)?;
        }
    }
    Ok(())
}

/// Runs one attempt: inline without a timeout, else on a thread that is abandoned (with its
/// cancellation flag raised) when the timeout passes. A panic counts as a failed attempt.
fn run_attempt(
    implementation: Arc<dyn Node>,
    mut ctx: NodeContext,
    timeout: Option<Duration>,
) -> Result<(NodeResult, ContextDeltas), NodeError> {
    let Some(timeout) = timeout else {
        let outcome = catch_unwind(AssertUnwindSafe(|| implementation.execute(&mut ctx)))
            .unwrap_or_else(|panic| Err(NodeError::new(panic_message(panic))));
        return outcome.map(|r| (r, ctx.context.into_deltas()));
    };
    let cancel = ctx.cancel.clone();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let spawned = std::thread::Builder::new()
        .name(format!("node-{}", ctx.node_id))
        .spawn(move || {
            let outcome = catch_unwind(AssertUnwindSafe(|| implementation.execute(&mut ctx)))
                .unwrap_or_else(|panic| Err(NodeError::new(panic_message(panic))));
            let _ = tx.send(outcome.map(|r| (r, ctx.context.into_deltas())));
        });
    if let Err(e) = spawned {
        return Err(NodeError::new(format!("cannot start attempt thread: {e}")));
    }
    match rx.recv_timeout(timeout) {
        Ok(outcome) => outcome,
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
            cancel.cancel();
            Err(NodeError::new(format!(
                "attempt timed out after {} ms",
                timeout.as_millis()
            )))
        }
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
            Err(NodeError::new("attempt thread ended without a result"))
        }
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("node panicked: {text}")
}

/// Resolves a node's input (SPEC §2): without `inputs`, the context key `_inputs.<nodeId>`;
/// with a string or an object of strings, each source resolved by [`resolve_source`].
pub fn resolve_input(node: &NodeDef, context: &ContextView) -> Value {
    match &node.inputs {
        None => context
            .get(&format!("{INPUTS_PREFIX}{}", node.id))
            .cloned()
            .unwrap_or(Value::Null),
        Some(NodeInputs::Key(source)) => resolve_source(source, context),
        Some(NodeInputs::Map(map)) => Value::Object(
            map.iter()
                .map(|(k, source)| (k.clone(), resolve_source(source, context)))
                .collect(),
        ),
    }
}

/// Resolves one input source: `_key` → that context key as is; `node.path.sub` → the path
/// inside `_outputs.node`; `node` → `_outputs.node` if present, else the context key `node`.
pub fn resolve_source(source: &str, context: &ContextView) -> Value {
    if source.starts_with('_') {
        return context.get(source).cloned().unwrap_or(Value::Null);
    }
    let mut parts = source.split('.');
    let head = parts.next().unwrap_or_default();
    if let Some(output) = context.get(&format!("{OUTPUTS_PREFIX}{head}")) {
        let mut current = output;
        for part in parts {
            current = match step(current, part) {
                Some(v) => v,
                None => return Value::Null,
            };
        }
        return current.clone();
    }
    if let Some(v) = context.get(source) {
        return v.clone();
    }
    let mut current = match context.get(head) {
        Some(v) => v,
        None => return Value::Null,
    };
    for part in source.split('.').skip(1) {
        current = match step(current, part) {
            Some(v) => v,
            None => return Value::Null,
        };
    }
    current.clone()
}

fn step<'v>(value: &'v Value, part: &str) -> Option<&'v Value> {
    match value {
        Value::Object(m) => m.get(part),
        Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn blueprint(json: &str) -> Blueprint {
        Blueprint::from_json(json).unwrap()
    }

    fn run(
        bp: &Blueprint,
        node: &str,
        reg: &NodeRegistry,
        ctx: Value,
    ) -> Result<NodeSuccess, NodeFailure> {
        let snapshot = Arc::new(ctx.as_object().cloned().unwrap_or_default());
        let job = NodeJob {
            blueprint: bp,
            node: bp.node_by_id(node).unwrap(),
            run_id: "r1",
            run_cancel: None,
            queued_attempt: None,
            lazy: None,
        };
        execute_node(job, reg, snapshot)
    }

    #[test]
    fn input_resolution_follows_the_spec() {
        let mut snap = ContextMap::new();
        snap.insert("_outputs.fetch".into(), json!({"user": {"name": "ann"}}));
        snap.insert("_secret".into(), json!(7));
        snap.insert("plain".into(), json!("p"));
        snap.insert("_inputs.n".into(), json!(42));
        let view = ContextView::new(Arc::new(snap));
        assert_eq!(resolve_source("_secret", &view), json!(7));
        assert_eq!(resolve_source("fetch.user.name", &view), json!("ann"));
        assert_eq!(
            resolve_source("fetch", &view),
            json!({"user": {"name": "ann"}})
        );
        assert_eq!(resolve_source("plain", &view), json!("p"));
        assert_eq!(resolve_source("missing.x", &view), Value::Null);
        let node: NodeDef = serde_json::from_value(json!({"id": "n", "uses": "u"})).unwrap();
        assert_eq!(resolve_input(&node, &view), json!(42));
        let node: NodeDef = serde_json::from_value(
            json!({"id": "n", "uses": "u", "inputs": {"a": "fetch.user.name", "b": "_secret"}}),
        )
        .unwrap();
        assert_eq!(resolve_input(&node, &view), json!({"a": "ann", "b": 7}));
    }

    #[test]
    fn retries_until_success() {
        let bp = blueprint(
            r#"{"id":"b","nodes":[{"id":"a","uses":"flaky","config":{"maxRetries":3}}]}"#,
        );
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let mut reg = NodeRegistry::new();
        reg.register_fn("flaky", move |ctx| {
            seen.fetch_add(1, Ordering::SeqCst);
            if ctx.attempt < 3 {
                Err(NodeError::new("not yet"))
            } else {
                Ok(NodeResult::output(json!(ctx.attempt)))
            }
        });
        let ok = run(&bp, "a", &reg, json!({})).unwrap();
        assert_eq!(ok.result.output, json!(3));
        assert_eq!(ok.attempts, 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn fatal_errors_skip_retries_and_fallback() {
        let bp = blueprint(
            r#"{"id":"b","nodes":[{"id":"a","uses":"bad","config":{"maxRetries":5,"fallback":"f"}},
            {"id":"f","uses":"ok"}]}"#,
        );
        let mut reg = NodeRegistry::new();
        reg.register_fn("bad", |_| Err(NodeError::fatal("broken for good")));
        reg.register_fn("ok", |_| Ok(NodeResult::output(json!("fb"))));
        let err = run(&bp, "a", &reg, json!({})).unwrap_err();
        assert!(err.fatal);
        assert_eq!(err.attempts, 1);
        assert_eq!(err.message, "broken for good");
    }

    #[test]
    fn fallback_runs_with_catch_error_after_last_attempt() {
        let bp = blueprint(
            r#"{"id":"b","nodes":[{"id":"a","uses":"bad","config":{"maxRetries":2,"fallback":"f"}},
            {"id":"f","uses":"fb"}]}"#,
        );
        let mut reg = NodeRegistry::new();
        reg.register_fn("bad", |_| Err(NodeError::new("boom")));
        reg.register_fn("fb", |ctx| {
            Ok(NodeResult::output(
                ctx.context.get("_catch_error").cloned().unwrap_or_default(),
            ))
        });
        let ok = run(&bp, "a", &reg, json!({})).unwrap();
        assert_eq!(ok.fallback.as_deref(), Some("f"));
        assert_eq!(ok.attempts, 2);
        assert_eq!(
            ok.result.output,
            json!({"message": "boom", "nodeId": "a", "blueprintId": "b"})
        );
        assert!(ok.deltas.get("_catch_error").is_some());
    }

    #[test]
    fn timeout_fails_the_attempt_and_raises_cancel() {
        let bp =
            blueprint(r#"{"id":"b","nodes":[{"id":"a","uses":"slow","config":{"timeout":50}}]}"#);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let mut reg = NodeRegistry::new();
        reg.register_fn("slow", move |ctx| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !ctx.cancel.is_cancelled() && std::time::Instant::now() < deadline {
                std::thread::yield_now();
            }
            let _ = tx.send(ctx.cancel.is_cancelled());
            Ok(NodeResult::output(json!("late")))
        });
        let err = run(&bp, "a", &reg, json!({})).unwrap_err();
        assert!(
            err.message.contains("timed out after 50 ms"),
            "{}",
            err.message
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
    }

    #[test]
    fn panics_are_failed_attempts() {
        let bp = blueprint(r#"{"id":"b","nodes":[{"id":"a","uses":"p"}]}"#);
        let mut reg = NodeRegistry::new();
        reg.register_fn("p", |_| panic!("kaboom"));
        let err = run(&bp, "a", &reg, json!({})).unwrap_err();
        assert!(err.message.contains("kaboom"));
    }

    #[test]
    fn unknown_uses_is_fatal() {
        let bp = blueprint(r#"{"id":"b","nodes":[{"id":"a","uses":"nope"}]}"#);
        let err = run(&bp, "a", &NodeRegistry::new(), json!({})).unwrap_err();
        assert!(err.fatal && err.message.contains("uses 'nope'"));
    }
}
