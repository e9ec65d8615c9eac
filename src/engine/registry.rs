//! [`NodeRegistry`]: the node implementations a runtime is built with, by `uses`, with its
//! lifecycle event listeners and node middleware ([`crate::engine::events`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::engine::events::{EventBus, EventListener, NodeMiddleware, Wrapped};
use crate::engine::node::{Node, NodeContext, NodeError, NodeResult};

/// Maps `uses` keys to implementations, with the lifecycle event listeners and the node
/// middleware ([`crate::engine::events`]) of the runtimes built with it. Cheap to clone
/// (implementations are shared, and so are the listeners).
#[derive(Clone, Default)]
pub struct NodeRegistry {
    nodes: HashMap<String, Arc<dyn Node>>,
    events: EventBus,
    /// Shared with every wrapped lookup (a lookup only bumps a count).
    middleware: Arc<[Arc<dyn NodeMiddleware>]>,
}

impl fmt::Debug for NodeRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<_> = self.nodes.keys().collect();
        keys.sort();
        f.debug_struct("NodeRegistry").field("uses", &keys).finish()
    }
}

impl NodeRegistry {
    /// An empty registry (no built-ins).
    pub fn new() -> NodeRegistry {
        NodeRegistry::default()
    }

    /// Registers a [`Node`] under a key, replacing any previous one.
    pub fn register(&mut self, uses: impl Into<String>, node: impl Node) -> &mut Self {
        self.nodes.insert(uses.into(), Arc::new(node));
        self
    }

    /// Registers a closure under a key.
    pub fn register_fn<F>(&mut self, uses: impl Into<String>, f: F) -> &mut Self
    where
        F: Fn(&mut NodeContext) -> Result<NodeResult, NodeError> + Send + Sync + 'static,
    {
        self.register(uses, f)
    }

    /// Looks an implementation up (wrapped in the middleware, if any).
    pub fn get(&self, uses: &str) -> Option<Arc<dyn Node>> {
        let node = self.nodes.get(uses).cloned()?;
        if self.middleware.is_empty() {
            return Some(node);
        }
        Some(Arc::new(Wrapped {
            node,
            middleware: self.middleware.clone(),
        }))
    }

    /// Adds a listener of lifecycle events (see [`crate::engine::events`]): called on a
    /// thread of its own, never holding up a job.
    pub fn listen(&mut self, listener: impl EventListener) -> &mut Self {
        self.events.listen(listener);
        self
    }

    /// Wraps every attempt of every node in a middleware; the first added is the outermost.
    pub fn wrap(&mut self, middleware: impl NodeMiddleware) -> &mut Self {
        let mut chain = self.middleware.to_vec();
        chain.push(Arc::new(middleware));
        self.middleware = chain.into();
        self
    }

    /// Where the runtimes emit lifecycle events.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Whether a key is registered.
    pub fn contains(&self, uses: &str) -> bool {
        self.nodes.contains_key(uses)
    }
}
