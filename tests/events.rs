//! Lifecycle events and node middleware, in process and on the distributed worker: the same
//! events from both, and a listener that fails or hangs changes nothing a run does.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use crossbeam_channel::{unbounded, Receiver};
use flowcraft_rabbitmq::node::{ContextMap, NodeContext, NodeError, NodeRegistry, NodeResult};
use flowcraft_rabbitmq::{Blueprint, EventKind, FlowEvent, LocalRuntime, Next, NodeMiddleware};
use serde_json::json;

/// a → b (fails its first attempt) → c; `d` fails for good.
fn blueprints() -> (Blueprint, Blueprint) {
    let retrying = bp(&json!({"id": "retrying", "nodes": [
        {"id": "a", "uses": "inc"},
        {"id": "b", "uses": "flaky", "config": {"maxRetries": 2}},
        {"id": "c", "uses": "inc"}],
      "edges": [{"source": "a", "target": "b"}, {"source": "b", "target": "c"}]})
    .to_string());
    let failing = bp(
        &json!({"id": "failing", "nodes": [{"id": "d", "uses": "broken"}], "edges": []})
            .to_string(),
    );
    (retrying, failing)
}

/// Records the order in which attempts ran through it.
struct Trace(Arc<Mutex<Vec<String>>>);

impl NodeMiddleware for Trace {
    fn around(&self, ctx: &mut NodeContext, next: Next<'_>) -> Result<NodeResult, NodeError> {
        self.0
            .lock()
            .unwrap()
            .push(format!("{}#{}", ctx.node_id, ctx.attempt));
        next(ctx)
    }
}

/// A registry whose listener sends every event to the returned receiver.
fn registry() -> (NodeRegistry, Receiver<FlowEvent>, Arc<Mutex<Vec<String>>>) {
    let mut registry = flaky_registry("not yet", "broken for good");
    let (tx, rx) = unbounded();
    // A listener that panics on every event is logged and changes nothing.
    registry.listen(|_: &FlowEvent| panic!("a listener's bug"));
    registry.listen(move |e: &FlowEvent| {
        let _ = tx.send(e.clone());
    });
    let trace = Arc::new(Mutex::new(Vec::new()));
    registry.wrap(Trace(trace.clone()));
    (registry, rx, trace)
}

/// The events of one run, until its `workflow:finish`.
fn events_of(rx: &Receiver<FlowEvent>, run: &str) -> Vec<FlowEvent> {
    let mut events = Vec::new();
    loop {
        let event = rx.recv_timeout(WAIT).expect("the run's events arrive");
        if event.run_id != run {
            continue;
        }
        let last = event.kind == EventKind::WorkflowFinish;
        events.push(event);
        if last {
            return events;
        }
    }
}

/// (name, node, attempt) of each event, and checks durations and errors.
fn summary(events: &[FlowEvent]) -> Vec<(String, Option<String>, Option<u32>)> {
    for e in events {
        match e.kind {
            EventKind::NodeFinish | EventKind::NodeRetry | EventKind::NodeError => {
                assert!(e.duration.is_some(), "{e:?}")
            }
            _ => {}
        }
        if matches!(e.kind, EventKind::NodeRetry | EventKind::NodeError) {
            assert!(e.error.is_some(), "{e:?}");
        }
    }
    events
        .iter()
        .map(|e| (e.kind.name().to_string(), e.node_id.clone(), e.attempt))
        .collect()
}

fn expected_retrying() -> Vec<(String, Option<String>, Option<u32>)> {
    let node = |name: &str, id: &str, attempt: u32| {
        (name.to_string(), Some(id.to_string()), Some(attempt))
    };
    vec![
        ("workflow:start".to_string(), None, None),
        node("node:start", "a", 1),
        node("node:finish", "a", 1),
        node("node:start", "b", 1),
        node("node:retry", "b", 1),
        node("node:start", "b", 2),
        node("node:finish", "b", 2),
        node("node:start", "c", 1),
        node("node:finish", "c", 1),
        ("workflow:finish".to_string(), None, None),
    ]
}

/// The events of a run of `failing`: its one node fails for good.
fn assert_failed_run(events: &[FlowEvent]) {
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        kinds,
        [
            "workflow:start",
            "node:start",
            "node:error",
            "workflow:finish"
        ]
    );
    assert_eq!(events[2].error.as_deref(), Some("broken for good"));
    assert_eq!(events[3].status.as_deref(), Some("failed"));
}

#[test]
fn the_in_process_runner_emits_flowcraft_s_events_and_runs_the_middleware() {
    let (retrying, failing) = blueprints();
    let (registry, rx, trace) = registry();
    let runtime = LocalRuntime::builder(registry)
        .blueprints([retrying.clone(), failing.clone()])
        .build();
    let done = runtime.run(&retrying, ContextMap::new());
    assert_eq!(done.status, "completed");
    let events = events_of(&rx, &done.run_id);
    assert_eq!(summary(&events), expected_retrying());
    assert_eq!(events.last().unwrap().status.as_deref(), Some("completed"));
    assert_eq!(*trace.lock().unwrap(), ["a#1", "b#1", "b#2", "c#1"]);

    let failed = runtime.run(&failing, ContextMap::new());
    assert_failed_run(&events_of(&rx, &failed.run_id));
}

/// A start node that fails its first attempt: its retry does not start the run again.
#[test]
fn a_retried_start_node_starts_its_run_once() {
    let env = TestEnv::new("events_start");
    let retried = bp(&json!({"id": "retried_start", "nodes": [
        {"id": "s", "uses": "flaky", "config": {"maxRetries": 2}},
        {"id": "t", "uses": "inc"}],
      "edges": [{"source": "s", "target": "t"}]})
    .to_string());
    let (registry, rx, _) = registry();
    let worker = env.start_worker(registry, vec![retried.clone()], 2);
    let run = env.start_run(&retried, ContextMap::new());
    env.wait_for_status(&run, "completed", WAIT);
    let kinds: Vec<String> = events_of(&rx, &run)
        .iter()
        .map(|e| e.kind.name().to_string())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "workflow:start").count(),
        1,
        "{kinds:?}"
    );
    assert!(kinds.contains(&"node:retry".to_string()), "{kinds:?}");
    worker.stop().unwrap();
}

#[test]
fn the_worker_emits_the_same_events_and_a_hung_listener_holds_nothing_up() {
    let env = TestEnv::new("events");
    let (retrying, failing) = blueprints();
    let (registry, rx, trace) = registry();
    let worker = env.start_worker(registry, vec![retrying.clone(), failing.clone()], 2);
    let done = env.start_run(&retrying, ContextMap::new());
    env.wait_for_status(&done, "completed", WAIT);
    let events = events_of(&rx, &done);
    assert_eq!(summary(&events), expected_retrying());
    assert_eq!(*trace.lock().unwrap(), ["a#1", "b#1", "b#2", "c#1"]);

    let failed = env.start_run(&failing, ContextMap::new());
    env.wait_for_status(&failed, "failed", WAIT);
    assert_failed_run(&events_of(&rx, &failed));

    worker.stop().unwrap();

    // A listener that never returns holds the event thread from the first event on: the
    // jobs go on, their events wait in the bounded queue (or are dropped).
    let (chain, _) = workload("chain5");
    let mut registry = inc_registry();
    let (_release, hang) = crossbeam_channel::bounded::<()>(0);
    registry.listen(move |_: &FlowEvent| {
        let _ = hang.recv();
    });
    let bus = registry.events().clone();
    let worker = env.start_worker(registry, vec![chain.clone()], 2);
    let runs: Vec<String> = (0..20)
        .map(|_| env.start_run(&chain, ContextMap::new()))
        .collect();
    for run in &runs {
        env.wait_for_status(run, "completed", WAIT);
    }
    worker.stop().unwrap();
    // Their events (about 240) wait in the queue behind the hung listener: none dropped.
    assert!(bus.is_listened());
    assert_eq!(bus.dropped(), 0);
}
