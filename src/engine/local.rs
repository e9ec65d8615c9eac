//! The in-process runner: a whole run in this process, with no queue, database or cache.
//!
//! [`LocalRuntime::run`] executes a blueprint from its start nodes to the end: independent
//! ready nodes run concurrently on a bounded pool of scoped threads (a lone ready node runs
//! inline, so a chain pays no thread hop), joins are counted in memory, and the run ends
//! `completed` (nothing left to do), `failed` (a node failed without fallback) or `awaiting`
//! (a `wait`/`webhook` node paused it; [`LocalRuntime::resume`] continues it). A `sleep` is
//! a timer of the run: the runner waits for it, then goes on from the node.
//!
//! ```
//! use flowcraft_rabbitmq::{Blueprint, LocalRuntime, NodeRegistry, NodeResult, RunStatus};
//! let bp = Blueprint::from_json(r#"{"id":"two","nodes":[{"id":"a","uses":"inc"},
//!     {"id":"b","uses":"inc"}],"edges":[{"source":"a","target":"b"}]}"#).unwrap();
//! let mut registry = NodeRegistry::with_builtins();
//! registry.register_fn("inc", |ctx| Ok(NodeResult::output((ctx.input.as_i64().unwrap_or(0) + 1).into())));
//! let result = LocalRuntime::new(registry).run(&bp, Default::default());
//! assert_eq!(result.status, RunStatus::Completed);
//! assert_eq!(result.context["_outputs.b"], 2);
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::engine::blueprint::{Blueprint, NodeDef};
use crate::engine::events::{EventKind, FlowEvent};
use crate::engine::executor::{execute_node, NodeFailure, NodeJob, NodeSuccess};
use crate::engine::flow::{self, choose_successors, readiness, Readiness, RunNode};
use crate::engine::node::{CancelFlag, ContextMap, NodeError, NodeResult};
use crate::engine::nodes::{batch, subflow};
use crate::engine::registry::NodeRegistry;
use crate::vocabulary::keys::{batch_key, input_key, AWAITING_DETAILS, AWAITING_NODE_IDS};
use crate::vocabulary::RunStatus;

/// The longest a run waiting for a sleep's timer sleeps before looking at its cancel flag.
const TIMER_STEP: Duration = Duration::from_millis(50);

/// Default bound on how often one node may execute in one run (loops).
pub const DEFAULT_MAX_ITERATIONS: u32 = 1_000;
/// Subflows may nest this deep.
pub const MAX_SUBFLOW_DEPTH: usize = 16;

/// A node failure recorded in a [`WorkflowResult`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowError {
    /// Id of the node that failed.
    pub node_id: String,
    /// Why, e.g. `node 'n' failed after 3 attempt(s): <last error>`, or the iteration limit.
    pub message: String,
}

/// The outcome of an in-process run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowResult {
    /// Id of this run: a fresh UUID v4 for every `run` or `resume` call.
    pub run_id: String,
    /// `completed`, `failed` or `awaiting`; never `running` or `cancelled`.
    pub status: RunStatus,
    /// The final context, with `_awaitingNodeIds` / `_awaitingDetails` when `awaiting`.
    pub context: ContextMap,
    /// Node failures that ended the run, in the order they happened; empty unless `failed`.
    pub errors: Vec<WorkflowError>,
}

/// Errors of [`LocalRuntime::run_by_id`].
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// No blueprint with this id was added to the runtime.
    #[error("unknown blueprint '{0}'")]
    UnknownBlueprint(String),
}

struct Inner {
    blueprints: HashMap<String, Arc<Blueprint>>,
    registry: NodeRegistry,
    threads: usize,
    max_iterations: u32,
}

/// Runs blueprints in this process. Cheap to clone.
#[derive(Clone)]
pub struct LocalRuntime {
    inner: Arc<Inner>,
}

/// Builder for [`LocalRuntime`].
pub struct LocalRuntimeBuilder {
    blueprints: HashMap<String, Arc<Blueprint>>,
    registry: NodeRegistry,
    threads: usize,
    max_iterations: u32,
}

impl LocalRuntimeBuilder {
    /// Adds a blueprint (needed for `subflow` and [`LocalRuntime::run_by_id`]).
    pub fn blueprint(self, bp: Blueprint) -> Self {
        self.blueprints([bp])
    }

    /// Adds several blueprints.
    pub fn blueprints(mut self, bps: impl IntoIterator<Item = Blueprint>) -> Self {
        crate::engine::blueprint::add_blueprints(&mut self.blueprints, bps);
        self
    }

    /// Threads that execute independent nodes concurrently (default: 4; at least 1).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// How often one node may execute in one run before the run fails (default 1 000).
    pub fn max_iterations(mut self, n: u32) -> Self {
        self.max_iterations = n.max(1);
        self
    }

    /// Builds the runtime. The registry's `subflow` is replaced by one that runs the child
    /// in process, inside the node's attempt, so retries and fallback apply to it.
    pub fn build(self) -> LocalRuntime {
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| {
            let mut registry = self.registry;
            let weak = weak.clone();
            registry.register_fn("subflow", move |ctx| {
                let inner = weak
                    .upgrade()
                    .ok_or_else(|| NodeError::fatal("runtime is gone"))?;
                LocalRuntime { inner }.run_subflow(ctx)
            });
            Inner {
                blueprints: self.blueprints,
                registry,
                threads: self.threads,
                max_iterations: self.max_iterations,
            }
        });
        LocalRuntime { inner }
    }
}

impl LocalRuntime {
    /// A runtime with defaults and no blueprints.
    pub fn new(registry: NodeRegistry) -> LocalRuntime {
        LocalRuntime::builder(registry).build()
    }

    /// A builder.
    pub fn builder(registry: NodeRegistry) -> LocalRuntimeBuilder {
        LocalRuntimeBuilder {
            blueprints: HashMap::new(),
            registry,
            threads: 4,
            max_iterations: DEFAULT_MAX_ITERATIONS,
        }
    }

    /// Runs a known blueprint by id.
    pub fn run_by_id(&self, id: &str, initial: ContextMap) -> Result<WorkflowResult, LocalError> {
        let bp = self
            .inner
            .blueprints
            .get(id)
            .cloned()
            .ok_or_else(|| LocalError::UnknownBlueprint(id.to_string()))?;
        Ok(self.run(&bp, initial))
    }

    /// Runs a blueprint from its start nodes with an initial context.
    pub fn run(&self, bp: &Blueprint, initial: ContextMap) -> WorkflowResult {
        self.run_cancellable(bp, initial, &CancelFlag::new())
    }

    /// Like [`run`](Self::run), until `cancel` is raised (from another thread): then the
    /// executing nodes see their flag raised (an `exec` node kills its program), nothing new
    /// starts, and the run ends `cancelled`.
    pub fn run_cancellable(
        &self,
        bp: &Blueprint,
        initial: ContextMap,
        cancel: &CancelFlag,
    ) -> WorkflowResult {
        self.run_with_id(bp, initial, uuid::Uuid::new_v4().to_string(), cancel)
    }

    fn run_with_id(
        &self,
        bp: &Blueprint,
        mut initial: ContextMap,
        run_id: String,
        cancel: &CancelFlag,
    ) -> WorkflowResult {
        bp.stamp(&mut initial);
        self.inner
            .registry
            .events()
            .emit_with(|| FlowEvent::new(EventKind::WorkflowStart, &run_id, bp.id()));
        let mut state = RunState::new(self, bp, initial, run_id);
        state.cancel = cancel.clone();
        for &s in bp.start_nodes() {
            state.ready.push_back(RunNode::Static(s));
        }
        state.drive()
    }

    /// Continues a paused run: sets `_resume.action` / `_resume.output`, records `output` as
    /// every awaited node's output, clears the awaiting keys and runs on from those nodes.
    pub fn resume(
        &self,
        bp: &Blueprint,
        context: ContextMap,
        action: Option<String>,
        output: Value,
    ) -> WorkflowResult {
        self.resume_nodes(bp, context, None, action, output)
    }

    /// Like [`resume`](Self::resume), for the awaited nodes named in `nodes` only (all when
    /// `None`); the others stay awaited. A name that is not awaited is ignored.
    pub fn resume_nodes(
        &self,
        bp: &Blueprint,
        mut context: ContextMap,
        nodes: Option<&[String]>,
        action: Option<String>,
        output: Value,
    ) -> WorkflowResult {
        let awaiting: Vec<String> = context
            .remove(AWAITING_NODE_IDS)
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        let mut details = match context.remove(AWAITING_DETAILS) {
            Some(Value::Object(d)) => d,
            _ => serde_json::Map::new(),
        };
        let (resumed, still): (Vec<String>, Vec<String>) = awaiting
            .into_iter()
            .partition(|id| nodes.is_none_or(|n| n.contains(id)));
        context.insert(
            "_resume.action".into(),
            action.clone().map(Value::String).unwrap_or(Value::Null),
        );
        context.insert("_resume.output".into(), output.clone());
        let mut state = RunState::new(self, bp, context, uuid::Uuid::new_v4().to_string());
        for id in still {
            if let Some(d) = details.remove(&id) {
                state.awaiting_details.insert(id.clone(), d);
            }
            state.awaiting.push(id);
        }
        for id in resumed {
            let node = match bp.node_index(&id) {
                Some(i) => RunNode::Static(i),
                None => continue,
            };
            let paused = details.remove(&id).unwrap_or(Value::Null);
            let outcome = if paused.get("childContext").is_some() {
                // A subflow whose child paused: the resume is the child's.
                match self.resume_child(&id, paused, action.clone(), output.clone()) {
                    ChildResumed::Done(outcome) => outcome,
                    ChildResumed::StillAwaiting(paused) => {
                        state.awaiting.push(id.clone());
                        state.awaiting_details.insert(id, paused);
                        continue;
                    }
                }
            } else {
                Ok(NodeSuccess::of(NodeResult {
                    output: output.clone(),
                    action: action.clone(),
                    ..NodeResult::default()
                }))
            };
            state.complete(node, outcome);
        }
        state.drive()
    }

    /// Resumes the paused child of a subflow node (its details hold the child's context):
    /// the node's result once the child completes, or its new details while it still waits.
    fn resume_child(
        &self,
        node_id: &str,
        mut paused: Value,
        action: Option<String>,
        output: Value,
    ) -> ChildResumed {
        let child_id = paused["blueprintId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let fail = |message: String| {
            ChildResumed::Done(Err(NodeFailure {
                node_id: node_id.to_string(),
                message,
                fatal: false,
                attempts: 1,
                retry_after_ms: None,
            }))
        };
        let Some(child) = self.inner.blueprints.get(&child_id).cloned() else {
            return fail(format!("subflow names unknown blueprint '{child_id}'"));
        };
        let context = match paused.get_mut("childContext").map(Value::take) {
            Some(Value::Object(context)) => context,
            _ => ContextMap::new(),
        };
        let outcome = self.resume_nodes(&child, context, None, action, output);
        match outcome.status {
            RunStatus::Completed => {
                let (result, deltas) = subflow::subflow_result(&paused, &child, &outcome.context);
                ChildResumed::Done(Ok(NodeSuccess {
                    deltas,
                    ..NodeSuccess::of(result)
                }))
            }
            RunStatus::Awaiting => {
                paused["childContext"] = Value::Object(outcome.context);
                ChildResumed::StillAwaiting(paused)
            }
            other => fail(format!("subflow '{child_id}' ended {other}")),
        }
    }

    fn execute(
        &self,
        bp: &Blueprint,
        node: &NodeDef,
        run_id: &str,
        snapshot: Arc<ContextMap>,
        cancel: &CancelFlag,
    ) -> Result<NodeSuccess, NodeFailure> {
        let job = NodeJob {
            blueprint: bp,
            node,
            run_id,
            run_cancel: Some(cancel),
            queued_attempt: None,
            lazy: None,
        };
        execute_node(job, &self.inner.registry, snapshot)
    }

    /// The in-process `subflow`: runs the child inside the parent's attempt; a child that
    /// pauses pauses the node, which carries the child's context in its details.
    fn run_subflow(
        &self,
        ctx: &mut crate::engine::node::NodeContext,
    ) -> Result<NodeResult, NodeError> {
        let depth = ctx.run_id.matches('/').count();
        if depth >= MAX_SUBFLOW_DEPTH {
            return Err(NodeError::fatal(format!(
                "subflows nest deeper than {MAX_SUBFLOW_DEPTH} levels"
            )));
        }
        let details = subflow::subflow(ctx)?.awaiting.unwrap_or(Value::Null);
        let child_id = details["blueprintId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let child = self
            .inner
            .blueprints
            .get(&child_id)
            .cloned()
            .ok_or_else(|| {
                NodeError::fatal(format!("subflow names unknown blueprint '{child_id}'"))
            })?;
        let initial = subflow::child_initial_context(&details, &child);
        let child_run = format!("{}/{}", ctx.run_id, ctx.node_id);
        let outcome = self.run_with_id(&child, initial, child_run, &ctx.cancel);
        match outcome.status {
            RunStatus::Completed => {
                let (result, deltas) = subflow::subflow_result(&details, &child, &outcome.context);
                for (k, v) in deltas.iter() {
                    match v {
                        Some(v) => ctx.context.set(k, v.clone()),
                        None => ctx.context.delete(k),
                    }
                }
                Ok(result)
            }
            RunStatus::Awaiting => {
                // The child paused: so does the parent's subflow node, carrying the child's
                // state; resuming the parent resumes the child (see `resume_nodes`).
                let mut paused = details;
                paused["childRunId"] = Value::String(format!("{}/{}", ctx.run_id, ctx.node_id));
                paused["childContext"] = Value::Object(outcome.context);
                Ok(NodeResult::awaiting(paused))
            }
            other => {
                let reasons: Vec<String> = outcome
                    .errors
                    .iter()
                    .map(|e| format!("{}: {}", e.node_id, e.message))
                    .collect();
                Err(NodeError::new(format!(
                    "subflow '{child_id}' ended {other}{}",
                    if reasons.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", reasons.join("; "))
                    }
                )))
            }
        }
    }
}

type Completion = (RunNode, Result<NodeSuccess, NodeFailure>);

/// What resuming a subflow's paused child came to.
enum ChildResumed {
    /// The child ended: the subflow node's outcome.
    Done(Result<NodeSuccess, NodeFailure>),
    /// The child paused again: the node's new details.
    StillAwaiting(Value),
}

struct RunState<'a> {
    runtime: &'a LocalRuntime,
    bp: &'a Blueprint,
    run_id: String,
    context: Arc<ContextMap>,
    ready: VecDeque<RunNode>,
    executions: HashMap<String, u32>,
    joins: HashMap<(usize, u32), HashSet<String>>,
    any_fired: HashSet<(usize, u32)>,
    awaiting: Vec<String>,
    awaiting_details: serde_json::Map<String, Value>,
    /// Sleeping nodes and when they wake.
    timers: Vec<(Instant, RunNode)>,
    /// Raised to cancel the run.
    cancel: CancelFlag,
    /// Batch workers past their batch's `chunkSize`, by gather node, in item order.
    waiting_workers: HashMap<String, VecDeque<RunNode>>,
    errors: Vec<WorkflowError>,
}

impl<'a> RunState<'a> {
    fn new(
        runtime: &'a LocalRuntime,
        bp: &'a Blueprint,
        context: ContextMap,
        run_id: String,
    ) -> Self {
        RunState {
            runtime,
            bp,
            run_id,
            context: Arc::new(context),
            ready: VecDeque::new(),
            executions: HashMap::new(),
            joins: HashMap::new(),
            any_fired: HashSet::new(),
            awaiting: Vec::new(),
            awaiting_details: serde_json::Map::new(),
            timers: Vec::new(),
            cancel: CancelFlag::new(),
            waiting_workers: HashMap::new(),
            errors: Vec::new(),
        }
    }

    /// Runs until nothing is ready or executing. A lone ready node runs inline; otherwise
    /// nodes go to up to `threads` scoped worker threads.
    fn drive(mut self) -> WorkflowResult {
        let threads = self.runtime.inner.threads;
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<(RunNode, Arc<ContextMap>)>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Completion>();
        let runtime = self.runtime;
        let bp = self.bp;
        let run_id = self.run_id.clone();
        let cancel = self.cancel.clone();
        let cancel = &cancel;
        std::thread::scope(|scope| {
            let mut workers = 0usize;
            let mut executing = 0usize;
            loop {
                // Everything ready is handed out at once with one shared snapshot; the pool
                // of `threads` workers bounds how many run at a time.
                while self.errors.is_empty() && !cancel.is_cancelled() {
                    let Some(node) = self.ready.pop_front() else {
                        break;
                    };
                    let snapshot = self.context.clone();
                    if executing == 0 && self.ready.is_empty() {
                        let outcome = runtime.execute(bp, node.def(bp), &run_id, snapshot, cancel);
                        self.complete(node, outcome);
                        continue;
                    }
                    if workers < threads {
                        workers += 1;
                        let (job_rx, done_tx, run_id) =
                            (job_rx.clone(), done_tx.clone(), run_id.clone());
                        scope.spawn(move || {
                            for (node, snapshot) in job_rx.iter() {
                                let outcome =
                                    runtime.execute(bp, node.def(bp), &run_id, snapshot, cancel);
                                if done_tx.send((node, outcome)).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    if job_tx.send((node, snapshot)).is_err() {
                        break;
                    }
                    executing += 1;
                }
                let next_wake = self.timers.iter().map(|(at, _)| *at).min();
                if executing == 0 {
                    let live = self.errors.is_empty() && !cancel.is_cancelled();
                    let Some(at) = next_wake.filter(|_| live) else {
                        break;
                    };
                    // In steps, so that a cancel ends the wait.
                    let step = at.saturating_duration_since(Instant::now()).min(TIMER_STEP);
                    std::thread::sleep(step);
                    self.wake_due();
                    continue;
                }
                let received = match next_wake {
                    Some(at) => done_rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                    None => done_rx
                        .recv()
                        .map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
                };
                match received {
                    Ok((node, outcome)) => {
                        executing -= 1;
                        self.complete(node, outcome);
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => self.wake_due(),
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                }
            }
            drop(job_tx);
        });
        self.finish()
    }

    /// Wakes the sleeping nodes whose time has come: a sleep passes its input through.
    fn wake_due(&mut self) {
        if self.cancel.is_cancelled() || !self.errors.is_empty() {
            // The run is over: a timer wakes nothing.
            self.timers.clear();
            return;
        }
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.timers)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.timers = later;
        for (_, node) in due {
            let id = node.def(self.bp).id.clone();
            let input = self
                .context
                .get(&input_key(&id))
                .cloned()
                .unwrap_or(Value::Null);
            self.apply(node, NodeSuccess::of(NodeResult::output(input)));
        }
    }

    fn finish(mut self) -> WorkflowResult {
        let status = if self.cancel.is_cancelled() {
            RunStatus::Cancelled
        } else if !self.errors.is_empty() {
            RunStatus::Failed
        } else if !self.awaiting.is_empty() {
            RunStatus::Awaiting
        } else {
            RunStatus::Completed
        };
        if status == RunStatus::Awaiting {
            let ctx = Arc::make_mut(&mut self.context);
            ctx.insert(AWAITING_NODE_IDS.into(), json!(self.awaiting));
            ctx.insert(
                AWAITING_DETAILS.into(),
                Value::Object(self.awaiting_details),
            );
        }
        self.runtime.inner.registry.events().emit_with(|| {
            let error = self.errors.first().map(|e| e.message.as_str());
            FlowEvent::workflow_finish(&self.run_id, self.bp.id(), status.as_str(), error)
        });
        WorkflowResult {
            run_id: self.run_id,
            status,
            context: Arc::try_unwrap(self.context).unwrap_or_else(|shared| (*shared).clone()),
            errors: self.errors,
        }
    }

    fn fail(&mut self, node_id: &str, message: String) {
        log::info!("run {}: node '{node_id}' failed: {message}", self.run_id);
        self.errors.push(WorkflowError {
            node_id: node_id.to_string(),
            message,
        });
    }

    /// Applies a finished node: its writes and output, then its successors.
    fn complete(&mut self, node: RunNode, outcome: Result<NodeSuccess, NodeFailure>) {
        let bp = self.bp;
        let id = node.def(bp).id.clone();
        let success = match outcome {
            Ok(s) => s,
            Err(failure) => return self.fail(&id, failure.to_string()),
        };
        let count = self.executions.entry(id.clone()).or_insert(0);
        *count += 1;
        if *count > self.runtime.inner.max_iterations {
            let limit = self.runtime.inner.max_iterations;
            return self.fail(
                &id,
                format!("node '{id}' exceeded the iteration limit ({limit} executions in one run)"),
            );
        }
        self.apply(node, success);
    }

    /// Applies a node's success: its pause, or its writes, output and successors.
    fn apply(&mut self, node: RunNode, success: NodeSuccess) {
        let bp = self.bp;
        let id = node.def(bp).id.clone();
        let NodeSuccess {
            result,
            mut deltas,
            fallback,
            ..
        } = success;
        if let Some(details) = result.awaiting {
            deltas.apply_to(Arc::make_mut(&mut self.context));
            if details.get("type").and_then(Value::as_str) == Some("sleep") {
                // In process a sleep is a timer of this run: it wakes where it paused.
                let ms = details["durationMs"].as_u64().unwrap_or(0);
                self.timers
                    .push((Instant::now() + Duration::from_millis(ms), node));
                return;
            }
            self.awaiting.push(id.clone());
            self.awaiting_details.insert(id, details);
            return;
        }
        match node {
            RunNode::Static(_) => {
                flow::record_output(&mut deltas, &id, fallback.as_deref(), &result.output)
            }
            RunNode::Dynamic(_) => flow::record_worker_output(&mut deltas, &id, &result.output),
        }
        let ctx = Arc::make_mut(&mut self.context);
        deltas.apply_to(ctx);
        match node {
            RunNode::Static(index) => {
                let fallback_index = fallback.as_deref().and_then(|f| bp.node_index(f));
                let taken = choose_successors(bp, index, fallback_index, &result, ctx);
                for t in taken {
                    let source = bp.edge(t.edge).source.clone();
                    self.arrive(t.edge, t.target, source, t.input);
                }
                let def = bp.node(index);
                if def.uses == flow::BATCH_SCATTER && result.dynamic_nodes.is_empty() {
                    if let Some(g) = def
                        .params
                        .get("gatherNodeId")
                        .and_then(Value::as_str)
                        .and_then(|g| bp.node_index(g))
                    {
                        self.ready.push_back(RunNode::Static(g));
                    }
                }
                // A batch's `chunkSize` bounds its workers in flight; the rest wait their turn.
                let chunk = batch::chunk_size(&def.params).unwrap_or(usize::MAX);
                for (i, d) in result.dynamic_nodes.iter().enumerate() {
                    let worker = RunNode::Dynamic(Arc::new(batch::def_from_dynamic(d)));
                    if i < chunk {
                        self.ready.push_back(worker);
                    } else if let Some(gather) = batch::gather_of(&d.id) {
                        self.waiting_workers
                            .entry(gather.to_string())
                            .or_default()
                            .push_back(worker);
                    }
                }
            }
            RunNode::Dynamic(_) => self.worker_done(&id),
        }
    }

    /// A batch worker finished: its gather runs once every worker of the batch has.
    fn worker_done(&mut self, worker: &str) {
        let Some(gather_id) = batch::gather_of(worker) else {
            return;
        };
        let Some(gather) = self.bp.node_index(gather_id) else {
            return;
        };
        let expected = self
            .context
            .get(&batch_key(gather_id))
            .map(batch::worker_count)
            .unwrap_or(0);
        if let Some(next) = self
            .waiting_workers
            .get_mut(gather_id)
            .and_then(VecDeque::pop_front)
        {
            self.ready.push_back(next);
        }
        let generation = self.generation(gather);
        let done = self.joins.entry((gather, generation)).or_default();
        done.insert(worker.to_string());
        if done.len() >= expected {
            self.joins.remove(&(gather, generation));
            self.ready.push_back(RunNode::Static(gather));
        }
    }

    fn generation(&self, node: usize) -> u32 {
        self.executions
            .get(&self.bp.node(node).id)
            .copied()
            .unwrap_or(0)
    }

    /// A predecessor reported to a target over an edge, with the target's input. An `any`
    /// join keeps the winner's input; later predecessors change nothing.
    fn arrive(&mut self, edge: usize, target: usize, predecessor: String, input: Value) {
        let generation = self.generation(target);
        let rule = readiness(self.bp, edge);
        // A node outside loops runs once (a join after a loop hears from it repeatedly).
        let ran_for_good = generation > 0 && !self.bp.may_repeat(target);
        let any_decided = rule == Readiness::Any
            && (ran_for_good || self.any_fired.contains(&(target, generation)));
        if !any_decided {
            Arc::make_mut(&mut self.context).insert(input_key(&self.bp.node(target).id), input);
        }
        if ran_for_good {
            return;
        }
        match rule {
            Readiness::Immediate => self.ready.push_back(RunNode::Static(target)),
            Readiness::All(n) => {
                let reported = self.joins.entry((target, generation)).or_default();
                reported.insert(predecessor);
                if reported.len() >= n {
                    self.joins.remove(&(target, generation));
                    self.ready.push_back(RunNode::Static(target));
                }
            }
            Readiness::Any => {
                if self.any_fired.insert((target, generation)) {
                    self.ready.push_back(RunNode::Static(target));
                }
            }
        }
    }
}
