//! Lifecycle events and node middleware, in both runtimes alike.
//!
//! Listeners ([`EventListener`]) receive Flowcraft's event names — `workflow:start`,
//! `workflow:finish`, `node:start`, `node:finish`, `node:retry`, `node:error`,
//! `batch:start`, `batch:finish` — with the run, the node, the attempt, the duration and the
//! error. They are registered on the [`NodeRegistry`](crate::engine::node::NodeRegistry)
//! that both the in-process runner and the distributed worker are built with, and the
//! executor that both call emits the node events, so a listener sees the same events from
//! either.
//!
//! A listener never holds up a job: events go through a bounded queue to one thread of
//! their own, which calls the listeners in order; when the queue is full, events are
//! dropped and counted ([`EventBus::dropped`]); a listener that panics is logged and called
//! again for the next event. Nothing a listener does changes what a job commits.
//!
//! Middleware ([`NodeMiddleware`]) wraps every attempt of every node, inline: for tracing
//! spans, timing, per-node policies. It runs inside the attempt, so its panic fails the
//! attempt like the node's own.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::engine::node::{Node, NodeContext, NodeError, NodeResult};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A run's first node starts (`workflow:start`).
    WorkflowStart,
    /// A run ended or paused: its status says which (`workflow:finish`).
    WorkflowFinish,
    /// An attempt of a node starts (`node:start`).
    NodeStart,
    /// A node finished (`node:finish`), with its duration.
    NodeFinish,
    /// An attempt failed and another follows (`node:retry`), with the error.
    NodeRetry,
    /// A node failed for good (`node:error`), with the error.
    NodeError,
    /// A `batch-scatter` made its workers (`batch:start`).
    BatchStart,
    /// A `batch-gather` gathered them (`batch:finish`).
    BatchFinish,
}

impl EventKind {
    /// Flowcraft's name of the event.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::WorkflowStart => "workflow:start",
            EventKind::WorkflowFinish => "workflow:finish",
            EventKind::NodeStart => "node:start",
            EventKind::NodeFinish => "node:finish",
            EventKind::NodeRetry => "node:retry",
            EventKind::NodeError => "node:error",
            EventKind::BatchStart => "batch:start",
            EventKind::BatchFinish => "batch:finish",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One lifecycle event.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowEvent {
    /// What happened.
    pub kind: EventKind,
    /// The run.
    pub run_id: String,
    /// The run's blueprint.
    pub blueprint_id: String,
    /// The node, for node and batch events.
    pub node_id: Option<String>,
    /// The attempt (1-based), for node events.
    pub attempt: Option<u32>,
    /// How long the attempt (or node) took, for `node:finish`, `node:retry`, `node:error`.
    pub duration: Option<Duration>,
    /// Why it failed, for `node:retry` and `node:error`.
    pub error: Option<String>,
    /// The run's status, for `workflow:finish`: `completed` or `failed`; in process also
    /// `cancelled`, or `awaiting` when the run stopped to wait (a distributed run that waits
    /// has not finished, and its cancel comes from a client, not a worker).
    pub status: Option<String>,
}

impl FlowEvent {
    /// An event of a run, with nothing else filled in.
    pub fn new(kind: EventKind, run_id: &str, blueprint_id: &str) -> FlowEvent {
        FlowEvent {
            kind,
            run_id: run_id.to_string(),
            blueprint_id: blueprint_id.to_string(),
            node_id: None,
            attempt: None,
            duration: None,
            error: None,
            status: None,
        }
    }

    /// `workflow:finish` of a run: its status (`completed`, `failed`, …) and, for a failed
    /// run, why.
    pub fn workflow_finish(
        run_id: &str,
        blueprint_id: &str,
        status: &str,
        error: Option<&str>,
    ) -> FlowEvent {
        let mut event = FlowEvent::new(EventKind::WorkflowFinish, run_id, blueprint_id);
        event.status = Some(status.to_string());
        event.error = error.map(String::from);
        event
    }

    /// The event of a node.
    pub fn node(mut self, node_id: &str, attempt: u32) -> FlowEvent {
        self.node_id = Some(node_id.to_string());
        self.attempt = Some(attempt);
        self
    }
}

/// Receives lifecycle events (on the event thread, never on a job's).
pub trait EventListener: Send + Sync + 'static {
    /// Called once per event, in order.
    fn on_event(&self, event: &FlowEvent);
}

impl<F: Fn(&FlowEvent) + Send + Sync + 'static> EventListener for F {
    fn on_event(&self, event: &FlowEvent) {
        self(event)
    }
}

/// The rest of an attempt, as a middleware calls it.
pub type Next<'a> = &'a mut dyn FnMut(&mut NodeContext) -> Result<NodeResult, NodeError>;

/// Wraps every attempt of every node: call `next` to run the attempt (or the next
/// middleware), or return without calling it to decide the attempt yourself.
pub trait NodeMiddleware: Send + Sync + 'static {
    /// One attempt of `ctx.node_id`.
    fn around(&self, ctx: &mut NodeContext, next: Next<'_>) -> Result<NodeResult, NodeError>;
}

/// Events waiting for the event thread, at most.
pub const EVENT_QUEUE: usize = 10_000;

/// Where events go: the listeners, called on a thread of their own. Cheap to clone (clones
/// share the listeners and the thread).
#[derive(Clone, Default)]
pub struct EventBus {
    inner: Arc<BusInner>,
}

#[derive(Default)]
struct BusInner {
    /// Replaced whole by `listen`, so that the event thread takes it with a count bump.
    listeners: RwLock<Arc<[Arc<dyn EventListener>]>>,
    sender: OnceLock<Option<Sender<FlowEvent>>>,
    dropped: AtomicU64,
}

impl fmt::Debug for EventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBus")
            .field("listeners", &self.listener_count())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl EventBus {
    /// Adds a listener.
    pub fn listen(&self, listener: impl EventListener) {
        let mut listeners = self
            .inner
            .listeners
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut added = listeners.to_vec();
        added.push(Arc::new(listener));
        *listeners = added.into();
    }

    fn listener_count(&self) -> usize {
        self.inner
            .listeners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Whether anybody listens (emitting is free when nobody does).
    pub fn is_listened(&self) -> bool {
        self.listener_count() > 0
    }

    /// Hands an event to the event thread; never waits. Dropped (and counted) when
    /// [`EVENT_QUEUE`] events are waiting already.
    pub fn emit(&self, event: FlowEvent) {
        self.emit_with(|| event);
    }

    /// Emits the event `make` builds, built only when somebody listens: the runtimes pay
    /// nothing for events nobody reads.
    pub fn emit_with(&self, make: impl FnOnce() -> FlowEvent) {
        if !self.is_listened() {
            return;
        }
        let sender = self.inner.sender.get_or_init(|| self.start_thread());
        let sent = sender
            .as_ref()
            .is_some_and(|sender| sender.try_send(make()).is_ok());
        if !sent {
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events dropped because the listeners fell behind.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// The event thread: calls the listeners for each event, in order, until the bus is
    /// gone. `None` if the thread cannot start (events are then dropped).
    fn start_thread(&self) -> Option<Sender<FlowEvent>> {
        let (tx, rx) = crossbeam_channel::bounded::<FlowEvent>(EVENT_QUEUE);
        // The thread holds the listeners weakly, so that dropping the bus ends it.
        let inner = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("flowcraft-events".into())
            .spawn(move || {
                for event in rx {
                    let Some(inner) = inner.upgrade() else { return };
                    let listeners = inner
                        .listeners
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    drop(inner);
                    for listener in listeners.iter() {
                        let called = catch_unwind(AssertUnwindSafe(|| listener.on_event(&event)));
                        if called.is_err() {
                            log::warn!("an event listener panicked on {}", event.kind);
                        }
                    }
                }
            });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                log::warn!("cannot start the event thread ({e}); events are dropped");
                None
            }
        }
    }
}

/// A node wrapped in middleware: the first middleware is the outermost.
pub(crate) struct Wrapped {
    pub(crate) node: Arc<dyn Node>,
    pub(crate) middleware: Arc<[Arc<dyn NodeMiddleware>]>,
}

impl Node for Wrapped {
    fn execute(&self, ctx: &mut NodeContext) -> Result<NodeResult, NodeError> {
        call(&self.middleware, &*self.node, ctx)
    }
}

fn call(
    chain: &[Arc<dyn NodeMiddleware>],
    node: &dyn Node,
    ctx: &mut NodeContext,
) -> Result<NodeResult, NodeError> {
    match chain.split_first() {
        None => node.execute(ctx),
        Some((first, rest)) => first.around(ctx, &mut |ctx| call(rest, node, ctx)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::unbounded;

    #[test]
    fn events_reach_every_listener_in_order_even_after_one_panics() {
        let bus = EventBus::default();
        let (tx, rx) = unbounded();
        bus.listen(|e: &FlowEvent| {
            if e.kind == EventKind::NodeStart {
                panic!("a listener's bug");
            }
        });
        bus.listen(move |e: &FlowEvent| {
            let _ = tx.send(e.kind);
        });
        for kind in [
            EventKind::WorkflowStart,
            EventKind::NodeStart,
            EventKind::NodeFinish,
        ] {
            bus.emit(FlowEvent::new(kind, "r", "bp"));
        }
        let got: Vec<EventKind> = (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).expect("an event"))
            .collect();
        assert_eq!(
            got,
            [
                EventKind::WorkflowStart,
                EventKind::NodeStart,
                EventKind::NodeFinish
            ]
        );
        assert_eq!(bus.dropped(), 0);
    }

    #[test]
    fn a_stuck_listener_never_blocks_emitting_and_the_overflow_is_counted() {
        let bus = EventBus::default();
        let (release, wait) = crossbeam_channel::bounded::<()>(0);
        bus.listen(move |_: &FlowEvent| {
            let _ = wait.recv();
        });
        // The thread holds one event; EVENT_QUEUE more wait; the rest are dropped.
        let total = EVENT_QUEUE as u64 + 100;
        for _ in 0..total {
            bus.emit(FlowEvent::new(EventKind::NodeStart, "r", "bp"));
        }
        assert!(
            bus.dropped() >= 99 && bus.dropped() <= 100,
            "{}",
            bus.dropped()
        );
        drop(release);
    }

    #[test]
    fn middleware_wraps_the_attempt_outermost_first() {
        struct Tag(&'static str);
        impl NodeMiddleware for Tag {
            fn around(
                &self,
                ctx: &mut NodeContext,
                next: Next<'_>,
            ) -> Result<NodeResult, NodeError> {
                let result = next(ctx)?;
                let mut output = result.output.as_str().unwrap_or_default().to_string();
                output.push_str(self.0);
                Ok(NodeResult::output(serde_json::json!(output)))
            }
        }
        let node: Arc<dyn Node> =
            Arc::new(|_: &mut NodeContext| Ok(NodeResult::output(serde_json::json!("node"))));
        let wrapped = Wrapped {
            node,
            middleware: vec![
                Arc::new(Tag("+outer")) as Arc<dyn NodeMiddleware>,
                Arc::new(Tag("+inner")),
            ]
            .into(),
        };
        let mut ctx = NodeContext {
            input: serde_json::Value::Null,
            params: serde_json::Value::Null,
            context: crate::engine::node::ContextView::new(Arc::new(Default::default())),
            run_id: "r".into(),
            node_id: "n".into(),
            blueprint_id: "b".into(),
            attempt: 1,
            cancel: Default::default(),
        };
        let result = wrapped.execute(&mut ctx).unwrap();
        assert_eq!(result.output, serde_json::json!("node+inner+outer"));
    }
}
