//! `batch-scatter` and `batch-gather`: one dynamic worker node per item, gathered in order.
//!
//! The scatter records its batch under the context key `_batch.<gatherNodeId>`
//! (`{scatter, uses, params, count}`: a record of constant size, which every worker job
//! reads) and each item under `_inputs.<workerId>`, and returns
//! the worker nodes as dynamic nodes. Worker ids are `<gatherNodeId>#<index>`, so any worker
//! process can rebuild a worker's definition from the context alone
//! ([`dynamic_node_def`]). The gather runs once every worker has finished and outputs the
//! workers' outputs in item order.

use serde_json::{json, Value};

use crate::engine::blueprint::{Blueprint, NodeConfig, NodeDef};
use crate::engine::node::{DynamicNode, NodeContext, NodeError, NodeResult};
use crate::vocabulary::keys::{batch_key, input_key, output_key};

/// A `batch-scatter`'s `chunkSize`: how many of its workers run at once (`None`: all).
pub fn chunk_size(params: &Value) -> Option<usize> {
    params
        .get("chunkSize")
        .and_then(Value::as_u64)
        .filter(|&c| c > 0)
        .and_then(|c| usize::try_from(c).ok())
}

/// The id of worker `index` of a gather node's batch.
pub fn worker_id(gather_id: &str, index: usize) -> String {
    format!("{gather_id}#{index}")
}

/// The gather node of a worker id, if the id is one.
pub fn gather_of(worker_id: &str) -> Option<&str> {
    let (gather, index) = worker_id.rsplit_once('#')?;
    index.parse::<usize>().ok().map(|_| gather)
}

/// How many workers a batch record holds (`count`; records written before it was
/// introduced list their `workers`).
pub fn worker_count(batch: &Value) -> usize {
    match batch.get("count").and_then(Value::as_u64) {
        Some(count) => usize::try_from(count).unwrap_or(usize::MAX),
        None => batch
            .get("workers")
            .and_then(Value::as_array)
            .map_or(0, Vec::len),
    }
}

/// Whether `worker` is one of the batch's workers.
fn is_worker_of(batch: &Value, worker: &str) -> bool {
    match batch.get("workers").and_then(Value::as_array) {
        Some(workers) => workers.iter().any(|w| w.as_str() == Some(worker)),
        // Only the canonical spelling of an index below the count (`g#01` is no worker).
        None => worker.rsplit_once('#').is_some_and(|(_, index)| {
            index
                .parse::<usize>()
                .is_ok_and(|i| i < worker_count(batch) && i.to_string() == index)
        }),
    }
}

/// Whether a gather's batch runs again in later loop iterations (the gather may repeat):
/// then a round's workers and its gather share the scatter's iteration.
pub fn rounds_repeat(bp: &Blueprint, gather: usize) -> bool {
    bp.may_repeat(gather)
}

/// [`rounds_repeat`] for a batch worker id (false if its gather is not in `bp`).
pub fn worker_repeats(bp: &Blueprint, worker: &str) -> bool {
    gather_of(worker)
        .and_then(|g| bp.node_index(g))
        .is_some_and(|g| rounds_repeat(bp, g))
}

/// The worker ids of a gather node's batch, in item order.
pub fn workers_of(batch: &Value, gather_id: &str) -> Vec<String> {
    match batch.get("workers").and_then(Value::as_array) {
        Some(workers) => workers
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        None => (0..worker_count(batch))
            .map(|i| worker_id(gather_id, i))
            .collect(),
    }
}

/// Rebuilds a dynamic worker's definition from the batch record in the context.
pub fn dynamic_node_def(batch: &Value, worker: &str) -> Option<NodeDef> {
    let uses = batch.get("uses")?.as_str()?.to_string();
    if !is_worker_of(batch, worker) {
        return None;
    }
    Some(NodeDef {
        id: worker.to_string(),
        uses,
        params: batch.get("params").cloned().unwrap_or(Value::Null),
        inputs: None,
        config: NodeConfig::default(),
    })
}

/// Builds a node definition for a dynamic node returned by a node result.
pub fn def_from_dynamic(node: &DynamicNode) -> NodeDef {
    NodeDef {
        id: node.id.clone(),
        uses: node.uses.clone(),
        params: node.params.clone(),
        inputs: None,
        config: NodeConfig::default(),
    }
}

fn required_str<'a>(params: &'a Value, key: &str) -> Result<&'a str, NodeError> {
    params
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| NodeError::fatal(format!("batch-scatter needs params.{key} (a string)")))
}

/// `batch-scatter`: input is an array; params `workerUsesKey`, `gatherNodeId`, optional
/// `workerParams` (given to every worker) and `chunkSize` (accepted for Flowcraft
/// compatibility; every item becomes a worker at once).
pub fn scatter(ctx: &mut NodeContext) -> Result<NodeResult, NodeError> {
    let uses = required_str(&ctx.params, "workerUsesKey")?.to_string();
    let gather = required_str(&ctx.params, "gatherNodeId")?.to_string();
    let items = match &ctx.input {
        Value::Array(items) => items.clone(),
        other => {
            return Err(NodeError::fatal(format!(
                "batch-scatter input must be an array, got {}",
                type_name(other)
            )))
        }
    };
    let params = ctx
        .params
        .get("workerParams")
        .cloned()
        .unwrap_or(Value::Null);
    let count = items.len();
    let mut dynamic = Vec::with_capacity(count);
    for (i, item) in items.into_iter().enumerate() {
        let id = worker_id(&gather, i);
        ctx.context.set(input_key(&id), item.clone());
        dynamic.push(DynamicNode {
            id,
            uses: uses.clone(),
            params: params.clone(),
            input: item,
        });
    }
    ctx.context.set(
        batch_key(&gather),
        json!({"scatter": ctx.node_id, "uses": uses, "params": params, "count": count}),
    );
    Ok(NodeResult {
        output: json!({"gatherNodeId": gather, "count": count}),
        dynamic_nodes: dynamic,
        ..NodeResult::default()
    })
}

/// `batch-gather`: outputs its batch's worker outputs in item order; with `params.outputKey`
/// the array is also stored under that context key.
pub fn gather(ctx: &mut NodeContext) -> Result<NodeResult, NodeError> {
    let batch = ctx
        .context
        .get(&batch_key(&ctx.node_id))
        .cloned()
        .ok_or_else(|| {
            NodeError::fatal(format!(
                "batch-gather '{}' has no batch: no batch-scatter names it as gatherNodeId",
                ctx.node_id
            ))
        })?;
    // One read of every worker's output (a view that fetches keys would fetch them one by
    // one otherwise).
    let outputs: Vec<String> = workers_of(&batch, &ctx.node_id)
        .iter()
        .map(|w| output_key(w))
        .collect();
    ctx.context.prefetch(&outputs);
    let outputs: Vec<Value> = outputs
        .iter()
        .map(|key| ctx.context.get(key).cloned().unwrap_or(Value::Null))
        .collect();
    let output = Value::Array(outputs);
    if let Some(key) = ctx.params.get("outputKey").and_then(Value::as_str) {
        ctx.context.set(key, output.clone());
    }
    Ok(NodeResult::output(output))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_round_trip() {
        assert_eq!(worker_id("g", 3), "g#3");
        assert_eq!(gather_of("g#3"), Some("g"));
        assert_eq!(gather_of("a#b#12"), Some("a#b"));
        assert_eq!(gather_of("plain"), None);
        assert_eq!(gather_of("x#y"), None);
    }

    #[test]
    fn dynamic_defs_come_from_the_batch_record() {
        let batch = json!({"uses": "inc", "params": {"k": 1}, "workers": ["g#0", "g#1"]});
        let def = dynamic_node_def(&batch, "g#1").unwrap();
        assert_eq!(
            (def.uses.as_str(), def.params.clone()),
            ("inc", json!({"k": 1}))
        );
        assert!(dynamic_node_def(&batch, "g#7").is_none());
    }

    #[test]
    fn a_batch_record_counts_its_workers_instead_of_listing_them() {
        let batch = json!({"uses": "inc", "params": null, "count": 3});
        assert_eq!(worker_count(&batch), 3);
        assert_eq!(workers_of(&batch, "g"), ["g#0", "g#1", "g#2"]);
        assert!(dynamic_node_def(&batch, "g#2").is_some());
        for not_one in ["g#3", "g#01", "g#+1", "g#-1", "g"] {
            assert!(dynamic_node_def(&batch, not_one).is_none(), "{not_one}");
        }
        // Records written before `count` list their workers.
        let listed = json!({"uses": "inc", "workers": ["g#0", "g#1"]});
        assert_eq!(worker_count(&listed), 2);
        assert_eq!(workers_of(&listed, "g"), ["g#0", "g#1"]);
    }
}
