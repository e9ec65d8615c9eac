//! What to run next in the distributed runtime: a node's execution count, the jobs a finished
//! node makes (with their join rules), and the frontier of a stalled run.
//!
//! Shared by the per-job protocol, the reconciler and `resume`, so all three agree on what a
//! node's "iteration" is and on who reports to which join.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::engine::blueprint::Blueprint;
use crate::engine::flow::{self, choose_successors, readiness};
use crate::engine::node::{ContextMap, ContextRead, NodeResult};
use crate::engine::nodes::batch;
use crate::runtime::message::job_id;
use crate::services::redis::{JoinRule, SuccessorReport};
use crate::vocabulary::keys::{
    batch_key, meta_key, output_key, AWAITING_DETAILS, AWAITING_NODE_IDS, BATCH_PREFIX,
};

pub use crate::engine::flow::RunNode;

/// The highest committed iteration of a node plus one (0 when none): for nodes that may
/// repeat, from their committed `iters`; otherwise whether their output exists.
pub fn executions(bp: &Blueprint, node: &RunNode, context: &dyn ContextRead) -> u32 {
    let id = &node.def(bp).id;
    if node.may_repeat(bp) {
        committed_iterations(context, id)
            .filter_map(Value::as_u64)
            .max()
            .map_or(0, |i| i as u32 + 1)
    } else {
        u32::from(context.contains_key(&output_key(id)))
    }
}

/// Whether a given iteration of a node is committed: for repeating nodes, listed in its
/// `iters`; otherwise, its output exists.
pub fn is_committed(
    bp: &Blueprint,
    node: &RunNode,
    context: &dyn ContextRead,
    iteration: u32,
) -> bool {
    committed(context, &node.def(bp).id, node.may_repeat(bp), iteration)
}

/// Whether a batch worker's execution at `iteration` is committed (without rebuilding its
/// definition: batches may hold thousands of workers).
fn worker_committed(
    bp: &Blueprint,
    context: &dyn ContextRead,
    worker: &str,
    iteration: u32,
) -> bool {
    committed(
        context,
        worker,
        batch::worker_repeats(bp, worker),
        iteration,
    )
}

fn committed(context: &dyn ContextRead, id: &str, repeats: bool, iteration: u32) -> bool {
    if repeats {
        committed_iterations(context, id).any(|i| i.as_u64() == Some(u64::from(iteration)))
    } else {
        context.contains_key(&output_key(id))
    }
}

/// The committed iterations of a repeating node (`_node.<id>.iters`).
fn committed_iterations<'c>(
    context: &'c dyn ContextRead,
    node_id: &str,
) -> impl Iterator<Item = &'c Value> {
    context
        .get(&meta_key(node_id))
        .and_then(|m| m.get("iters"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// How many times a repeating node has executed in the run (its committed iterations).
pub fn execution_count(context: &dyn ContextRead, node_id: &str) -> usize {
    committed_iterations(context, node_id).count()
}

/// A repeating node's bookkeeping after one more committed iteration (for resumes, which
/// commit outside the worker's statement).
pub fn with_iteration(meta: Value, previous: Option<&Value>, iteration: u32) -> Value {
    let mut meta = meta;
    let mut iters = previous
        .and_then(|p| p.get("iters"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !iters
        .iter()
        .any(|i| i.as_u64() == Some(u64::from(iteration)))
    {
        iters.push(Value::from(iteration));
    }
    if let Some(m) = meta.as_object_mut() {
        m.insert("iters".into(), Value::Array(iters));
    }
    meta
}

/// The details of a node that is awaited now (listed in `_awaitingNodeIds`, with
/// `_awaitingDetails.<node>`).
pub fn awaited_details<'a>(context: &'a dyn ContextRead, node_id: &str) -> Option<&'a Value> {
    if !is_awaiting(context, node_id) {
        return None;
    }
    context.get(AWAITING_DETAILS)?.get(node_id)
}

/// The loop iteration at which a node paused (its details' `iteration`).
pub fn paused_iteration(details: &Value) -> u64 {
    details
        .get("iteration")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Whether the run currently awaits this node.
pub fn is_awaiting(context: &dyn ContextRead, node_id: &str) -> bool {
    context
        .get(AWAITING_NODE_IDS)
        .and_then(Value::as_array)
        .is_some_and(|ids| ids.iter().any(|v| v.as_str() == Some(node_id)))
}

/// A finished node's stored result (output plus the action/fallback bookkeeping), used to
/// re-derive successors after a redelivery or by the reconciler.
pub fn stored_result(
    context: &dyn ContextRead,
    node_id: &str,
) -> Option<(NodeResult, Option<String>)> {
    let output = context.get(&output_key(node_id))?.clone();
    let meta = context.get(&meta_key(node_id));
    let text = |k: &str| {
        meta.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .map(String::from)
    };
    Some((
        NodeResult {
            output,
            action: text("action"),
            ..NodeResult::default()
        },
        text("fallback"),
    ))
}

/// A node's bookkeeping entry: its result's action and fallback, and the successors it chose
/// (`[node, iteration, predecessor, join code]` each). Committed iterations (`iters`) are
/// added by the commit itself.
pub fn node_meta(action: Option<&str>, fallback: Option<&str>, next: &[SuccessorReport]) -> Value {
    let next: Vec<Value> = next
        .iter()
        .map(|s| serde_json::json!([s.node, s.iteration, s.predecessor, s.rule.code()]))
        .collect();
    let mut meta = serde_json::Map::new();
    if let Some(a) = action {
        meta.insert("action".into(), Value::from(a));
    }
    if let Some(f) = fallback {
        meta.insert("fallback".into(), Value::from(f));
    }
    meta.insert("next".into(), Value::Array(next));
    Value::Object(meta)
}

/// The successors a node chose when it was committed, if recorded.
pub fn stored_successors(context: &dyn ContextRead, node_id: &str) -> Option<Vec<SuccessorReport>> {
    let next = context.get(&meta_key(node_id))?.get("next")?.as_array()?;
    next.iter()
        .map(|entry| {
            let node = entry.get(0)?.as_str()?.to_string();
            let iteration = u32::try_from(entry.get(1)?.as_u64()?).ok()?;
            let predecessor = entry.get(2)?.as_str()?.to_string();
            let rule = JoinRule::from_code(entry.get(3)?.as_i64()?);
            Some(SuccessorReport {
                job: job_id(&node, iteration),
                node,
                iteration,
                predecessor,
                rule,
            })
        })
        .collect()
}

/// A job a finished node makes ready (subject to its join).
#[derive(Debug, Clone)]
pub struct NextJob {
    /// The successor job, its iteration and join rule, as reported to Redis.
    pub report: SuccessorReport,
    /// `_inputs.<target>` to write with the finishing node's commit.
    pub input: Option<Value>,
}

impl NextJob {
    /// Whether the target keeps the first input it is given: an `any` join outside loops
    /// takes its first committed predecessor's input, and later ones do not overwrite it (in
    /// loops each iteration's input replaces the last).
    pub fn keeps_first_input(&self, bp: &Blueprint) -> bool {
        self.report.rule == JoinRule::Any
            && !bp
                .node_index(&self.report.node)
                .is_some_and(|t| bp.may_repeat(t))
    }
}

/// The jobs a finished node reports to, with their join rules (SPEC §4), and the inputs to
/// record. `context` is the run's context with the node's writes applied; `iteration` is the
/// finished job's.
///
/// A successor's iteration follows the path: the same as its predecessor's over a forward
/// edge, one more over a back edge, and always 0 for nodes that never repeat. (Counting the
/// successor's own committed executions instead would race with its previous iteration
/// still running.)
pub fn next_jobs(
    bp: &Blueprint,
    node: &RunNode,
    result: &NodeResult,
    fallback: Option<&str>,
    context: &dyn ContextRead,
    iteration: u32,
) -> Vec<NextJob> {
    match node {
        RunNode::Dynamic(def) => {
            // A batch worker reports to its gather, which waits for every worker.
            let Some(gather_id) = batch::gather_of(&def.id) else {
                return Vec::new();
            };
            let Some(gather) = bp.node_index(gather_id) else {
                return Vec::new();
            };
            let workers = context
                .get(&batch_key(gather_id))
                .map_or(0, batch::worker_count);
            // The workers of a round and its gather share the scatter's iteration.
            let iteration = if batch::rounds_repeat(bp, gather) {
                iteration
            } else {
                0
            };
            let mut jobs = vec![NextJob {
                report: SuccessorReport {
                    job: job_id(gather_id, iteration),
                    node: gather_id.to_string(),
                    iteration,
                    predecessor: def.id.clone(),
                    rule: JoinRule::All(workers.max(1)),
                },
                input: None,
            }];
            // Under a `chunkSize` of c, worker i releases worker i + c when it finishes, so
            // at most c run at once (the scatter released the first c).
            let chunk = context
                .get(&batch_key(gather_id))
                .and_then(|b| b.get("scatter"))
                .and_then(Value::as_str)
                .and_then(|s| bp.node_by_id(s))
                .and_then(|scatter| batch::chunk_size(&scatter.params));
            let index = def
                .id
                .rsplit_once('#')
                .and_then(|(_, i)| i.parse::<usize>().ok());
            if let (Some(chunk), Some(index)) = (chunk, index) {
                if index + chunk < workers {
                    let next = batch::worker_id(gather_id, index + chunk);
                    jobs.push(NextJob {
                        report: SuccessorReport {
                            job: job_id(&next, iteration),
                            node: next,
                            iteration,
                            predecessor: def.id.clone(),
                            rule: JoinRule::Immediate,
                        },
                        input: None,
                    });
                }
            }
            jobs
        }
        RunNode::Static(index) => {
            let fallback_index = fallback.and_then(|f| bp.node_index(f));
            let mut jobs: Vec<NextJob> =
                choose_successors(bp, *index, fallback_index, result, context)
                    .into_iter()
                    .map(|taken| {
                        let target = bp.node(taken.target);
                        let rule = readiness(bp, taken.edge);
                        let iteration = if !bp.may_repeat(taken.target) {
                            0
                        } else if rule != JoinRule::Immediate {
                            // A join's predecessors may have taken different numbers of back
                            // edges (two loops meeting): they meet at the target's own next
                            // execution, as in the in-process runner.
                            executions(bp, &RunNode::Static(taken.target), context)
                        } else if bp.is_back_edge(taken.edge) {
                            iteration.saturating_add(1)
                        } else {
                            iteration
                        };
                        NextJob {
                            report: SuccessorReport {
                                job: job_id(&target.id, iteration),
                                node: target.id.clone(),
                                iteration,
                                predecessor: bp.edge(taken.edge).source.clone(),
                                rule,
                            },
                            input: Some(taken.input),
                        }
                    })
                    .collect();
            let def = bp.node(*index);
            if def.uses == flow::BATCH_SCATTER {
                let gather = def
                    .params
                    .get("gatherNodeId")
                    .and_then(Value::as_str)
                    .and_then(|g| bp.node_index(g));
                // Inside a loop the workers run again in every round: a round's workers and
                // its gather share the scatter's iteration.
                let repeats = gather.is_some_and(|g| batch::rounds_repeat(bp, g));
                let worker_iteration = if repeats { iteration } else { 0 };
                // Under a `chunkSize`, only the first chunk now; each worker releases the
                // next one when it finishes.
                let released = batch::chunk_size(&def.params).unwrap_or(usize::MAX);
                for d in result.dynamic_nodes.iter().take(released) {
                    jobs.push(NextJob {
                        report: SuccessorReport {
                            job: job_id(&d.id, worker_iteration),
                            node: d.id.clone(),
                            iteration: worker_iteration,
                            predecessor: def.id.clone(),
                            rule: JoinRule::Immediate,
                        },
                        input: None,
                    });
                }
                if let (true, Some(gather)) = (result.dynamic_nodes.is_empty(), gather) {
                    let id = &bp.node(gather).id;
                    jobs.push(NextJob {
                        report: SuccessorReport {
                            job: job_id(id, worker_iteration),
                            node: id.clone(),
                            iteration: worker_iteration,
                            predecessor: def.id.clone(),
                            rule: JoinRule::Immediate,
                        },
                        input: None,
                    });
                }
            }
            jobs
        }
    }
}

/// The start jobs of a run (registered in the ledger when a start job finishes).
pub fn start_jobs(bp: &Blueprint) -> Vec<String> {
    bp.start_node_ids().iter().map(|id| job_id(id, 0)).collect()
}

/// The frontier of a run (SPEC §6, reconciler): jobs that should run now and have not
/// committed — start nodes, and targets whose join is satisfied by the successors their
/// finished predecessors chose (as stored at commit time where the context could change the
/// choice), plus unfinished batch workers and gathers whose workers are all done. Awaited
/// nodes are not part of it.
pub fn frontier(bp: &Blueprint, context: &ContextMap) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = Vec::new();
    let push = |id: &str, iteration: u32, out: &mut Vec<(String, u32)>| {
        if !is_awaiting(context, id) && !out.iter().any(|(o, i)| o == id && *i == iteration) {
            out.push((id.to_string(), iteration));
        }
    };
    for &s in bp.start_nodes() {
        if !is_committed(bp, &RunNode::Static(s), context, 0) {
            push(&bp.node(s).id, 0, &mut out);
        }
    }
    // Who reported to which (target, iteration), under which rule.
    let mut reported: BTreeMap<(usize, u32), (JoinRule, Vec<String>)> = BTreeMap::new();
    for source in 0..bp.node_count() {
        let id = &bp.node(source).id;
        let stored = stored_successors(context, id);
        // A fallback that stood in for a node has no successors of its own: they are stored
        // under the node it replaced. (When it ran on its own, it stored them itself.)
        if stored.is_none() && !bp.fallback_of(source).is_empty() {
            continue;
        }
        let Some((result, fallback)) = stored_result(context, id) else {
            continue;
        };
        let node = RunNode::Static(source);
        let last = executions(bp, &node, context).saturating_sub(1);
        let reports = stored.unwrap_or_else(|| {
            next_jobs(bp, &node, &result, fallback.as_deref(), context, last)
                .into_iter()
                .map(|n| n.report)
                .collect()
        });
        for report in reports {
            match bp.node_index(&report.node) {
                Some(t) => reported
                    .entry((t, report.iteration))
                    .or_insert_with(|| (report.rule, Vec::new()))
                    .1
                    .push(report.predecessor),
                // A batch worker, at the scatter's iteration.
                None => {
                    if !worker_committed(bp, context, &report.node, report.iteration) {
                        push(&report.node, report.iteration, &mut out);
                    }
                }
            }
        }
    }
    for ((target, iteration), (rule, mut from)) in reported {
        if is_committed(bp, &RunNode::Static(target), context, iteration) {
            continue;
        }
        from.sort();
        from.dedup();
        let ready = match rule {
            JoinRule::Immediate | JoinRule::Any => true,
            JoinRule::All(n) => from.len() >= n,
        };
        if ready {
            push(&bp.node(target).id, iteration, &mut out);
        }
    }
    // Gathers whose workers have all finished.
    for (key, record) in context.iter() {
        let Some(gather) = key.strip_prefix(BATCH_PREFIX) else {
            continue;
        };
        let Some(g) = bp.node_index(gather) else {
            continue;
        };
        // The batch on record is the latest scatter's: its round's workers and gather share
        // the scatter's (latest) iteration.
        let gather_node = RunNode::Static(g);
        let iteration = if batch::rounds_repeat(bp, g) {
            record
                .get("scatter")
                .and_then(Value::as_str)
                .and_then(|s| bp.node_index(s))
                .map_or(0, |s| {
                    executions(bp, &RunNode::Static(s), context).saturating_sub(1)
                })
        } else {
            0
        };
        let workers_done = batch::workers_of(record, gather)
            .iter()
            .all(|w| worker_committed(bp, context, w, iteration));
        if workers_done && !is_committed(bp, &gather_node, context, iteration) {
            push(gather, iteration, &mut out);
        }
    }
    out
}
