//! [`Flow`]: blueprints built in Rust, in the spirit of Flowcraft's `createFlow`. It writes
//! the same document a JSON blueprint is ([`BlueprintDef`]), and [`Flow::build`] validates
//! it as loading does.
//!
//! ```
//! use flowcraft_rabbitmq::Flow;
//! use serde_json::json;
//!
//! let bp = Flow::new("orders")
//!     .version("2")
//!     .node("fetch", "exec", json!({"command": ["./fetch-order"]}))
//!     .retries(3, 200)
//!     .node("big", "transform", json!({"expression": "fetch.items"}))
//!     .node("small", "wait", json!(null))
//!     .edge_when("fetch", "big", "fetch.total > 100")
//!     .edge_when("fetch", "small", "fetch.total <= 100")
//!     .build()
//!     .unwrap();
//! assert_eq!(bp.start_node_ids(), ["fetch"]);
//! assert_eq!(bp.def().edges[0].condition.as_deref(), Some("fetch.total > 100"));
//! ```

use serde_json::{json, Map, Value};

use crate::engine::blueprint::{
    Blueprint, BlueprintDef, BlueprintError, EdgeDef, NodeConfig, NodeDef, NodeInputs,
};

/// A blueprint being built. Node settings (`retries`, `timeout`, `fallback`, `join_any`,
/// `inputs`) apply to the node added last; edge settings (`transform`) to the edge added
/// last.
#[derive(Debug, Clone)]
pub struct Flow {
    def: BlueprintDef,
}

impl Flow {
    /// An empty blueprint with this id.
    pub fn new(id: impl Into<String>) -> Flow {
        Flow {
            def: BlueprintDef {
                id: id.into(),
                metadata: Map::new(),
                nodes: Vec::new(),
                edges: Vec::new(),
            },
        }
    }

    /// `metadata.version`: runs of another version are refused (dead-lettered).
    pub fn version(mut self, version: impl Into<String>) -> Flow {
        self.def
            .metadata
            .insert("version".into(), Value::String(version.into()));
        self
    }

    /// A node running `uses` with `params` (`null` for none).
    pub fn node(mut self, id: impl Into<String>, uses: impl Into<String>, params: Value) -> Flow {
        self.def.nodes.push(NodeDef {
            id: id.into(),
            uses: uses.into(),
            params,
            inputs: None,
            config: NodeConfig::default(),
        });
        self
    }

    /// The last node's `config.maxRetries` (total attempts) and `retryDelay` (ms).
    pub fn retries(self, attempts: u32, delay_ms: u64) -> Flow {
        self.config(|c| {
            c.max_retries = Some(attempts);
            c.retry_delay = Some(delay_ms);
        })
    }

    /// The last node's `config.timeout` (ms per attempt).
    pub fn timeout(self, ms: u64) -> Flow {
        self.config(|c| c.timeout = Some(ms))
    }

    /// The last node's `config.fallback`.
    pub fn fallback(self, node: impl Into<String>) -> Flow {
        let node = node.into();
        self.config(|c| c.fallback = Some(node))
    }

    /// The last node's `config.joinStrategy` = `any`: it runs for the first predecessor.
    pub fn join_any(self) -> Flow {
        self.config(|c| c.join_strategy = Some("any".into()))
    }

    /// The last node's `inputs`: one source (`"fetch"`, `"fetch.items"`, `"_key"`).
    pub fn input(mut self, source: impl Into<String>) -> Flow {
        if let Some(node) = self.def.nodes.last_mut() {
            node.inputs = Some(NodeInputs::Key(source.into()));
        }
        self
    }

    fn config(mut self, set: impl FnOnce(&mut NodeConfig)) -> Flow {
        if let Some(node) = self.def.nodes.last_mut() {
            set(&mut node.config);
        }
        self
    }

    fn push_edge(
        mut self,
        source: String,
        target: String,
        action: Option<String>,
        condition: Option<String>,
    ) -> Flow {
        self.def.edges.push(EdgeDef {
            source,
            target,
            action,
            condition,
            transform: None,
        });
        self
    }

    /// An edge, always taken.
    pub fn edge(self, source: impl Into<String>, target: impl Into<String>) -> Flow {
        self.push_edge(source.into(), target.into(), None, None)
    }

    /// An edge taken when `condition` holds.
    pub fn edge_when(
        self,
        source: impl Into<String>,
        target: impl Into<String>,
        condition: impl Into<String>,
    ) -> Flow {
        self.push_edge(source.into(), target.into(), None, Some(condition.into()))
    }

    /// An edge taken when the source's result has `action`.
    pub fn edge_on(
        self,
        source: impl Into<String>,
        target: impl Into<String>,
        action: impl Into<String>,
    ) -> Flow {
        self.push_edge(source.into(), target.into(), Some(action.into()), None)
    }

    /// The last edge's `transform`: an expression whose value becomes the target's input.
    pub fn transform(mut self, expression: impl Into<String>) -> Flow {
        if let Some(edge) = self.def.edges.last_mut() {
            edge.transform = Some(expression.into());
        }
        self
    }

    /// A batch: `scatter` makes one `worker_uses` node per item of its input (each given
    /// `worker_params`), and `gather` outputs their outputs in item order. Connect the
    /// scatter's predecessor and the gather's successors with edges.
    pub fn batch(
        self,
        scatter: impl Into<String>,
        gather: impl Into<String>,
        worker_uses: impl Into<String>,
        worker_params: Value,
    ) -> Flow {
        let (scatter, gather) = (scatter.into(), gather.into());
        self.node(
            scatter.clone(),
            "batch-scatter",
            json!({"workerUsesKey": worker_uses.into(), "workerParams": worker_params,
                   "gatherNodeId": gather}),
        )
        .node(gather.clone(), "batch-gather", Value::Null)
        .edge(scatter, gather)
    }

    /// A loop: `controller` (a `loop-controller` over `condition`) goes on to `body` while
    /// the condition holds (`continue`), and to `exit` once it does not (`break`). Add an
    /// edge from the body's last node back to the controller.
    pub fn loop_while(
        self,
        controller: impl Into<String>,
        condition: impl Into<String>,
        body: impl Into<String>,
        exit: impl Into<String>,
    ) -> Flow {
        let controller = controller.into();
        self.node(
            controller.clone(),
            "loop-controller",
            json!({"condition": condition.into()}),
        )
        .edge_on(controller.clone(), body, "continue")
        .edge_on(controller, exit, "break")
    }

    /// The document as built, not yet validated.
    pub fn to_def(&self) -> &BlueprintDef {
        &self.def
    }

    /// The document as Flowcraft's JSON.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(&self.def).unwrap_or(Value::Null)
    }

    /// Validates and analyses the blueprint, as loading its JSON would.
    pub fn build(self) -> Result<Blueprint, BlueprintError> {
        Blueprint::new(self.def)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_same_document_as_json_says() {
        let flow = Flow::new("loop")
            .node("start", "transform", json!({"expression": "0"}))
            .loop_while("check", "(_outputs.body ?? 0) < 3", "body", "done")
            .node(
                "body",
                "transform",
                json!({"expression": "(context['_outputs.body'] ?? 0) + 1"}),
            )
            .edge("start", "check")
            .edge("body", "check")
            .node("done", "transform", json!({"expression": "'done'"}))
            .join_any();
        let json = flow.to_json();
        let loaded = Blueprint::from_json(&json.to_string()).unwrap();
        let built = flow.build().unwrap();
        assert_eq!(loaded.def(), built.def());
        assert_eq!(json["nodes"][1]["uses"], json!("loop-controller"));
        assert_eq!(json["edges"][0]["action"], json!("continue"));
        assert_eq!(json["nodes"][3]["config"]["joinStrategy"], json!("any"));
        // And it runs: three rounds of the body, then the exit.
        let result = crate::engine::local::LocalRuntime::new(
            crate::engine::registry::NodeRegistry::with_builtins(),
        )
        .run(&built, Map::new());
        assert_eq!(result.context["_outputs.body"], json!(3));
        assert_eq!(result.context["_outputs.done"], json!("done"));
    }

    #[test]
    fn a_batch_is_a_scatter_and_a_gather() {
        let bp = Flow::new("b")
            .node("items", "transform", json!({"expression": "[1, 2]"}))
            .batch(
                "scatter",
                "gather",
                "transform",
                json!({"expression": "input * 2"}),
            )
            .edge("items", "scatter")
            .build()
            .unwrap();
        assert_eq!(bp.def().nodes[1].params["gatherNodeId"], json!("gather"));
        assert!(Flow::new("bad").edge("a", "b").build().is_err());
    }
}
