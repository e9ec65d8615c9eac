//! Choosing successors (SPEC §4): which edges a finished node takes, what input each target
//! gets, and how a target with several predecessors joins them.
//!
//! Both runtimes call [`choose_successors`] with the node's result and the run's context
//! *after* the node's writes; they differ only in where join bookkeeping lives (a map in
//! process, Redis in the distributed worker).

use std::sync::Arc;

use serde_json::Value;

use crate::engine::blueprint::{Blueprint, JoinStrategy, NodeDef};
use crate::engine::expr::Scope;
use crate::engine::node::{ContextDeltas, ContextRead, ContextScope, NodeResult};
use crate::engine::nodes::batch;
use crate::vocabulary::keys::{batch_key, output_key, BLUEPRINT_ID, BLUEPRINT_VERSION};

/// `uses` of the loop controller built-in.
pub const LOOP_CONTROLLER: &str = "loop-controller";
/// `uses` of the batch scatter built-in.
pub const BATCH_SCATTER: &str = "batch-scatter";
/// `uses` of the batch gather built-in.
pub const BATCH_GATHER: &str = "batch-gather";

/// An edge chosen after a node finished.
#[derive(Debug, Clone, PartialEq)]
pub struct TakenEdge {
    /// Index of the edge in the blueprint.
    pub edge: usize,
    /// Index of the edge's target node in the blueprint.
    pub target: usize,
    /// The target's input (`transform` result, or the source's output).
    pub input: Value,
}

/// A node of a run: one of the blueprint, or a batch worker made at run time.
#[derive(Debug, Clone)]
pub enum RunNode {
    /// A blueprint node, by its index.
    Static(usize),
    /// A batch worker created at run time, with its definition.
    Dynamic(Arc<NodeDef>),
}

impl RunNode {
    /// Finds a node by id: in the blueprint, else as a batch worker recorded in the context.
    pub fn resolve(bp: &Blueprint, context: &dyn ContextRead, node_id: &str) -> Option<RunNode> {
        if let Some(i) = bp.node_index(node_id) {
            return Some(RunNode::Static(i));
        }
        let gather = batch::gather_of(node_id)?;
        let record = context.get(&batch_key(gather))?;
        batch::dynamic_node_def(record, node_id).map(|d| RunNode::Dynamic(Arc::new(d)))
    }

    /// The node's definition.
    pub fn def<'a>(&'a self, bp: &'a Blueprint) -> &'a NodeDef {
        match self {
            RunNode::Static(i) => bp.node(*i),
            RunNode::Dynamic(d) => d,
        }
    }

    /// Whether the node may execute several times in one run (on or after a cycle): its
    /// executions are counted per iteration. A batch worker repeats with its gather (a batch
    /// inside a loop scatters again in every iteration).
    pub fn may_repeat(&self, bp: &Blueprint) -> bool {
        match self {
            RunNode::Static(i) => bp.may_repeat(*i),
            RunNode::Dynamic(def) => batch::worker_repeats(bp, &def.id),
        }
    }
}

/// How a target of a taken edge becomes ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Ready at once (≤1 forward predecessor, or reached over a back edge).
    Immediate,
    /// Ready once this many distinct forward predecessors have reported.
    All(usize),
    /// The first predecessor to report wins.
    Any,
}

/// The scope conditions are evaluated in: `{...context, result}`.
pub struct ConditionScope<'a> {
    /// The run's context (with the node's writes); looked up by key.
    pub context: &'a dyn ContextRead,
    /// The finished node's `{"output", "action"}`, looked up as `result`.
    pub result: &'a Value,
}

impl Scope for ConditionScope<'_> {
    fn lookup(&self, key: &str) -> Option<&Value> {
        if key == "result" {
            Some(self.result)
        } else {
            self.context.get(key)
        }
    }
}

/// The scope edge transforms are evaluated in: `{input, context}`, `context` read key by
/// key ([`ContextScope`]).
struct TransformScope<'a> {
    input: &'a Value,
    context: &'a ContextScope<'a>,
}

impl Scope for TransformScope<'_> {
    fn lookup(&self, key: &str) -> Option<&Value> {
        match key {
            "input" => Some(self.input),
            _ => self.context.lookup_context(key),
        }
    }

    fn defers(&self, key: &str) -> bool {
        key == "context"
    }
}

/// Candidate edges of `source` (and of the fallback that stood in for it): their own
/// outgoing edges plus those of every node whose fallback they are, de-duplicated by
/// (source, target, action, condition).
fn candidate_edges(bp: &Blueprint, source: usize, fallback: Option<usize>) -> Vec<usize> {
    let mut nodes = vec![source];
    nodes.extend_from_slice(bp.fallback_of(source));
    if let Some(f) = fallback {
        nodes.push(f);
        nodes.extend_from_slice(bp.fallback_of(f));
    }
    let mut edges: Vec<usize> = Vec::new();
    for (i, &n) in nodes.iter().enumerate() {
        if nodes[..i].contains(&n) {
            continue;
        }
        for &e in bp.outgoing(n) {
            let d = bp.edge(e);
            let duplicate = edges.iter().any(|&o| {
                let x = bp.edge(o);
                x.source == d.source
                    && x.target == d.target
                    && x.action == d.action
                    && x.condition == d.condition
            });
            if !duplicate {
                edges.push(e);
            }
        }
    }
    edges
}

fn condition_holds(bp: &Blueprint, edge: usize, scope: &ConditionScope<'_>) -> bool {
    if !bp.has_condition(edge) {
        return true;
    }
    // (Every condition parsed when the blueprint loaded.)
    bp.condition(edge).is_some_and(|c| c.evaluate_bool(scope))
}

/// Chooses the edges a finished node takes (SPEC §4, rules 1–6).
///
/// `context` is the run's context including the node's own writes; `fallback` is the node
/// whose result stood in for `source`, if any.
pub fn choose_successors(
    bp: &Blueprint,
    source: usize,
    fallback: Option<usize>,
    result: &NodeResult,
    context: &dyn ContextRead,
) -> Vec<TakenEdge> {
    let candidates = candidate_edges(bp, source, fallback);
    if candidates.is_empty() {
        return Vec::new();
    }
    let result_value = result.to_condition_value();
    let scope = ConditionScope {
        context,
        result: &result_value,
    };
    let node = bp.node(source);
    let suppressed_target = if node.uses == BATCH_SCATTER {
        node.params.get("gatherNodeId").and_then(Value::as_str)
    } else {
        None
    };
    let mut taken: Vec<usize> = Vec::new();
    if node.uses == LOOP_CONTROLLER {
        taken = candidates
            .iter()
            .copied()
            .filter(|&e| bp.has_condition(e) && condition_holds(bp, e, &scope))
            .collect();
    }
    if taken.is_empty() {
        if let Some(action) = &result.action {
            taken = candidates
                .iter()
                .copied()
                .filter(|&e| bp.edge(e).action.as_deref() == Some(action.as_str()))
                .filter(|&e| condition_holds(bp, e, &scope))
                .collect();
        }
    }
    if taken.is_empty() {
        taken = candidates
            .iter()
            .copied()
            .filter(|&e| bp.edge(e).action.is_none() && condition_holds(bp, e, &scope))
            .collect();
    }
    let context_scope = ContextScope::new(context);
    taken
        .into_iter()
        .filter(|&e| Some(bp.edge(e).target.as_str()) != suppressed_target)
        .map(|e| {
            let input = match bp.transform(e) {
                Some(t) => t.evaluate(&TransformScope {
                    input: &result.output,
                    context: &context_scope,
                }),
                None if bp.edge(e).transform.is_some() => Value::Null,
                None => result.output.clone(),
            };
            TakenEdge {
                edge: e,
                target: bp.edge_ends(e).1,
                input,
            }
        })
        .collect()
}

/// How the target of a taken edge becomes ready.
pub fn readiness(bp: &Blueprint, edge: usize) -> Readiness {
    let target = bp.edge_ends(edge).1;
    if bp.is_back_edge(edge) {
        return Readiness::Immediate;
    }
    let predecessors = bp.forward_predecessors(target).len();
    if predecessors <= 1 {
        return Readiness::Immediate;
    }
    match bp.join_strategy(target) {
        JoinStrategy::All => Readiness::All(predecessors),
        JoinStrategy::Any => Readiness::Any,
    }
}

/// Records a finished node's output under `_outputs.<id>` and, as Flowcraft does since
/// 2.9.3, under the bare `<id>` — so conditions read `fetch.total` — and the same under the
/// fallback's id when one stood in. A bare id that names a key the runtime keeps for itself
/// (`blueprintId`, `blueprintVersion`, anything starting with `_`) is not written.
pub fn record_output(
    deltas: &mut ContextDeltas,
    node_id: &str,
    fallback: Option<&str>,
    output: &Value,
) {
    for id in std::iter::once(node_id).chain(fallback) {
        record_worker_output(deltas, id, output);
        if !id.starts_with('_') && id != BLUEPRINT_ID && id != BLUEPRINT_VERSION {
            deltas.set(id, output.clone());
        }
    }
}

/// Records a batch worker's output, under `_outputs.<id>` only: a batch's items are
/// gathered from there, and a bare key per item would only grow the run's context.
pub fn record_worker_output(deltas: &mut ContextDeltas, node_id: &str, output: &Value) {
    deltas.set(output_key(node_id), output.clone());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::node::ContextMap;
    use serde_json::json;

    fn bp(json: &str) -> Blueprint {
        Blueprint::from_json(json).unwrap()
    }

    fn targets(bp: &Blueprint, taken: &[TakenEdge]) -> Vec<String> {
        taken.iter().map(|t| bp.node(t.target).id.clone()).collect()
    }

    fn choose(b: &Blueprint, node: &str, result: NodeResult, ctx: Value) -> Vec<String> {
        let ctx = ctx.as_object().cloned().unwrap_or_default();
        let s = b.node_index(node).unwrap();
        targets(b, &choose_successors(b, s, None, &result, &ctx))
    }

    const ROUTER: &str = r#"{"id":"r","nodes":[{"id":"s","uses":"u"},{"id":"ok","uses":"u"},
        {"id":"bad","uses":"u"},{"id":"always","uses":"u"},{"id":"big","uses":"u"}],
        "edges":[{"source":"s","target":"ok","action":"ok"},
                 {"source":"s","target":"bad","action":"bad"},
                 {"source":"s","target":"always"},
                 {"source":"s","target":"big","condition":"result.output.total > 100"}]}"#;

    #[test]
    fn action_edges_are_taken_when_the_action_matches() {
        let b = bp(ROUTER);
        let r = NodeResult::output(json!({"total": 5})).with_action("ok");
        assert_eq!(choose(&b, "s", r, json!({})), vec!["ok"]);
    }

    #[test]
    fn default_edges_when_no_action_edge_matches() {
        let b = bp(ROUTER);
        let r = NodeResult::output(json!({"total": 500})).with_action("other");
        assert_eq!(choose(&b, "s", r, json!({})), vec!["always", "big"]);
        let r = NodeResult::output(json!({"total": 5}));
        assert_eq!(choose(&b, "s", r, json!({})), vec!["always"]);
    }

    #[test]
    fn conditions_see_the_context_and_the_result() {
        let b = bp(
            r#"{"id":"c","nodes":[{"id":"s","uses":"u"},{"id":"t","uses":"u"}],
            "edges":[{"source":"s","target":"t","condition":"limit < result.output && mode == 'on'"}]}"#,
        );
        let r = || NodeResult::output(json!(10));
        assert_eq!(
            choose(&b, "s", r(), json!({"limit": 3, "mode": "on"})),
            vec!["t"]
        );
        assert!(choose(&b, "s", r(), json!({"limit": 30, "mode": "on"})).is_empty());
        assert!(choose(&b, "s", r(), json!({"limit": 3})).is_empty());
    }

    #[test]
    fn transforms_compute_the_target_input() {
        let b = bp(
            r#"{"id":"t","nodes":[{"id":"s","uses":"u"},{"id":"t","uses":"u"},{"id":"p","uses":"u"}],
            "edges":[{"source":"s","target":"t","transform":"input.items"},
                     {"source":"s","target":"p"}]}"#,
        );
        let ctx = ContextMap::new();
        let r = NodeResult::output(json!({"items": [1, 2]}));
        let taken = choose_successors(&b, 0, None, &r, &ctx);
        assert_eq!(taken[0].input, json!([1, 2]));
        assert_eq!(taken[1].input, json!({"items": [1, 2]}));
        let b = bp(
            r#"{"id":"t","nodes":[{"id":"s","uses":"u"},{"id":"t","uses":"u"}],
            "edges":[{"source":"s","target":"t","transform":"context.factor * input"}]}"#,
        );
        let mut ctx = ContextMap::new();
        ctx.insert("factor".into(), json!(3));
        let taken = choose_successors(&b, 0, None, &NodeResult::output(json!(7)), &ctx);
        assert_eq!(taken[0].input, json!(21));
    }

    #[test]
    fn loop_controller_prefers_conditional_edges() {
        let b = bp(
            r#"{"id":"l","nodes":[{"id":"init","uses":"u"},{"id":"ctl","uses":"loop-controller"},
            {"id":"body","uses":"u"},{"id":"out","uses":"u"},{"id":"special","uses":"u"}],
            "edges":[{"source":"init","target":"ctl"},{"source":"ctl","target":"body","action":"continue"},
            {"source":"ctl","target":"out","action":"break"},
            {"source":"ctl","target":"special","condition":"flag == true"},
            {"source":"body","target":"ctl"}]}"#,
        );
        let cont = || NodeResult::output(json!(null)).with_action("continue");
        assert_eq!(
            choose(&b, "ctl", cont(), json!({"flag": true})),
            vec!["special"]
        );
        assert_eq!(
            choose(&b, "ctl", cont(), json!({"flag": false})),
            vec!["body"]
        );
    }

    #[test]
    fn fallback_inherits_the_failed_nodes_edges() {
        let b = bp(
            r#"{"id":"f","nodes":[{"id":"a","uses":"u","config":{"fallback":"fb"}},
            {"id":"fb","uses":"u"},{"id":"next","uses":"u"}],
            "edges":[{"source":"a","target":"next"}]}"#,
        );
        let fb = b.node_index("fb").unwrap();
        let a = b.node_index("a").unwrap();
        let ctx = ContextMap::new();
        let r = NodeResult::output(json!(1));
        assert_eq!(
            targets(&b, &choose_successors(&b, fb, None, &r, &ctx)),
            vec!["next"]
        );
        assert_eq!(
            targets(&b, &choose_successors(&b, a, Some(fb), &r, &ctx)),
            vec!["next"]
        );
    }

    #[test]
    fn duplicate_edges_are_taken_once() {
        let b = bp(
            r#"{"id":"d","nodes":[{"id":"a","uses":"u"},{"id":"b","uses":"u"}],
            "edges":[{"source":"a","target":"b"},{"source":"a","target":"b"}]}"#,
        );
        assert_eq!(
            choose(&b, "a", NodeResult::output(json!(1)), json!({})),
            vec!["b"]
        );
    }

    #[test]
    fn readiness_follows_join_strategy_and_back_edges() {
        let b = bp(
            r#"{"id":"j","nodes":[{"id":"a","uses":"u"},{"id":"b","uses":"u"},{"id":"c","uses":"u"},
            {"id":"all","uses":"u"},{"id":"any","uses":"u","config":{"joinStrategy":"any"}}],
            "edges":[{"source":"a","target":"b"},{"source":"a","target":"c"},
            {"source":"b","target":"all"},{"source":"c","target":"all"},
            {"source":"b","target":"any"},{"source":"c","target":"any"}]}"#,
        );
        assert_eq!(readiness(&b, 0), Readiness::Immediate);
        assert_eq!(readiness(&b, 2), Readiness::All(2));
        assert_eq!(readiness(&b, 4), Readiness::Any);
    }

    #[test]
    fn scatter_does_not_follow_its_gather_edge() {
        let b = bp(
            r#"{"id":"b","nodes":[{"id":"s","uses":"batch-scatter","params":{"gatherNodeId":"g","workerUsesKey":"w"}},
            {"id":"g","uses":"batch-gather"}],"edges":[{"source":"s","target":"g"}]}"#,
        );
        assert!(choose(&b, "s", NodeResult::output(json!(1)), json!({})).is_empty());
    }
}
