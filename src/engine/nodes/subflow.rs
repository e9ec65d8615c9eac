//! `subflow`: runs another blueprint as a child run and continues with its result.
//!
//! The node itself only pauses the parent and describes the child (`blueprintId` and its
//! initial context); the runtime starts the child (in process: at once; distributed: as a
//! child run) and, when it completes, turns the child's final context into the node's result
//! with [`subflow_result`].

use serde_json::{json, Map, Value};

use crate::engine::blueprint::Blueprint;
use crate::engine::executor::resolve_source;
use crate::engine::node::{ContextDeltas, ContextMap, NodeContext, NodeError, NodeResult};
use crate::vocabulary::keys::{input_key, output_key};

/// `subflow` node: params `blueprintId`, optional `inputs` ({childKey: parentSource}) and
/// `outputs` ({parentKey: childKey}).
pub fn subflow(ctx: &mut NodeContext) -> Result<NodeResult, NodeError> {
    let blueprint_id = ctx
        .params
        .get("blueprintId")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| NodeError::fatal("subflow needs params.blueprintId (a string)"))?
        .to_string();
    let mut initial = Map::new();
    match ctx.params.get("inputs") {
        Some(Value::Object(map)) => {
            for (child_key, source) in map {
                let source = source.as_str().ok_or_else(|| {
                    NodeError::fatal(format!(
                        "subflow params.inputs.{child_key} must be a string"
                    ))
                })?;
                initial.insert(child_key.clone(), resolve_source(source, &ctx.context));
            }
        }
        None | Some(Value::Null) => {}
        Some(_) => return Err(NodeError::fatal("subflow params.inputs must be an object")),
    }
    Ok(NodeResult::awaiting(json!({
        "type": "subflow",
        "blueprintId": blueprint_id,
        "initialContext": Value::Object(initial),
        "input": ctx.input,
        "outputs": ctx.params.get("outputs").cloned().unwrap_or(Value::Null),
    })))
}

/// The child's initial context: the mapped inputs; with no mapping, the subflow node's input
/// is given to each of the child's start nodes as `_inputs.<start>`.
pub fn child_initial_context(details: &Value, child: &Blueprint) -> ContextMap {
    let mut context = details
        .get("initialContext")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if context.is_empty() {
        if let Some(input) = details.get("input").filter(|v| !v.is_null()) {
            for start in child.start_node_ids() {
                context.insert(input_key(start), input.clone());
            }
        }
    }
    context
}

/// Turns a completed child's final context into the subflow node's result (SPEC §5): one
/// terminal node → its output; several → an object of terminal outputs by id; with
/// `outputs` ({parentKey: childKey}, copied from the node's params into `details`) the parent keys are set from the child's
/// `_outputs.<childKey>` (or `<childKey>`) and the output is the child's final context.
pub fn subflow_result(
    details: &Value,
    child: &Blueprint,
    child_context: &ContextMap,
) -> (NodeResult, ContextDeltas) {
    let mut deltas = ContextDeltas::default();
    if let Some(Value::Object(outputs)) = details.get("outputs") {
        for (parent_key, child_key) in outputs {
            let Some(child_key) = child_key.as_str() else {
                continue;
            };
            let value = child_context
                .get(&output_key(child_key))
                .or_else(|| child_context.get(child_key))
                .cloned()
                .unwrap_or(Value::Null);
            deltas.set(parent_key.clone(), value);
        }
        return (
            NodeResult::output(Value::Object(child_context.clone())),
            deltas,
        );
    }
    let terminals = child.terminal_node_ids();
    let output_of = |id: &str| {
        child_context
            .get(&output_key(id))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let output = match terminals.as_slice() {
        [only] => output_of(only),
        many => Value::Object(
            many.iter()
                .map(|id| (id.to_string(), output_of(id)))
                .collect(),
        ),
    };
    (NodeResult::output(output), deltas)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child(json: &str) -> Blueprint {
        Blueprint::from_json(json).unwrap()
    }

    #[test]
    fn single_terminal_gives_its_output() {
        let c = child(
            r#"{"id":"c","nodes":[{"id":"a","uses":"u"},{"id":"t","uses":"u"}],"edges":[{"source":"a","target":"t"}]}"#,
        );
        let mut ctx = ContextMap::new();
        ctx.insert("_outputs.t".into(), json!(5));
        let (r, d) = subflow_result(&json!({"blueprintId": "c"}), &c, &ctx);
        assert_eq!(r.output, json!(5));
        assert!(d.is_empty());
    }

    #[test]
    fn several_terminals_give_an_object() {
        let c = child(r#"{"id":"c","nodes":[{"id":"a","uses":"u"},{"id":"b","uses":"u"}]}"#);
        let mut ctx = ContextMap::new();
        ctx.insert("_outputs.a".into(), json!(1));
        let (r, _) = subflow_result(&json!({}), &c, &ctx);
        assert_eq!(r.output, json!({"a": 1, "b": null}));
    }

    #[test]
    fn outputs_mapping_sets_parent_keys() {
        let c = child(r#"{"id":"c","nodes":[{"id":"a","uses":"u"}]}"#);
        let mut ctx = ContextMap::new();
        ctx.insert("_outputs.a".into(), json!(1));
        ctx.insert("total".into(), json!(9));
        let (r, d) = subflow_result(
            &json!({"outputs": {"fromA": "a", "sum": "total"}}),
            &c,
            &ctx,
        );
        assert_eq!(d.get("fromA"), Some(Some(&json!(1))));
        assert_eq!(d.get("sum"), Some(Some(&json!(9))));
        assert_eq!(r.output, json!({"_outputs.a": 1, "total": 9}));
    }

    #[test]
    fn unmapped_input_goes_to_child_start_nodes() {
        let c = child(r#"{"id":"c","nodes":[{"id":"a","uses":"u"}]}"#);
        let ctx = child_initial_context(&json!({"initialContext": {}, "input": 3}), &c);
        assert_eq!(ctx.get("_inputs.a"), Some(&json!(3)));
    }
}
