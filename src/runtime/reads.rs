//! What work on a node reads: the keys of its run it is expected to read, loaded with the
//! run's status in one grouped query, and a view that fetches any other key when read — so
//! a job, or the resume of a paused node, costs what it reads, not the size of its run.

use std::sync::Arc;

use crate::engine::blueprint::{Blueprint, NodeInputs};
use crate::engine::node::{ContextView, LazyKeys};
use crate::engine::nodes::batch;
use crate::runtime::error::Error;
use crate::services::postgres::store::{RunKeys, RunSnapshot, RunStore, StoreError};
use crate::vocabulary::keys::{
    batch_key, input_key, meta_key, output_key, AWAITING_DETAILS, AWAITING_NODE_IDS, HEADER_KEYS,
};
use crate::vocabulary::RunStatus;

/// A run's status and a view of its context for work on `node_id`: the keys that work is
/// expected to read ([`expected_reads`]), loaded in one grouped query, and any other
/// fetched when read. `None` when the run has no context row.
pub(crate) fn keyed_view(
    store: &RunStore,
    run_id: &str,
    bp: Option<&Blueprint>,
    node_id: &str,
) -> Result<Option<(Option<RunStatus>, ContextView)>, Error> {
    let keys = expected_reads(bp, node_id);
    let Some(snapshot) = store.load_keys(run_id, keys.clone())? else {
        return Ok(None);
    };
    Ok(Some(view_of(store, run_id, keys, snapshot)))
}

/// The run's status and a view of its context from `snapshot`, the keys `keys` loaded: a
/// key asked for and not found is known absent; any other is fetched when read.
pub(crate) fn view_of(
    store: &RunStore,
    run_id: &str,
    keys: Vec<String>,
    snapshot: RunSnapshot,
) -> (Option<RunStatus>, ContextView) {
    let absent = keys
        .into_iter()
        .filter(|k| !snapshot.context.contains_key(k));
    let lazy = LazyKeys::new(RunKeys::new(store.clone(), run_id.to_string()));
    let lazy = Arc::new(lazy.absent(absent));
    let context = ContextView::with_lazy(Arc::new(snapshot.context), Some(lazy));
    (snapshot.status, context)
}

/// Fails (to be retried) if a key read on demand through `view` could not be fetched:
/// nothing decided from that read may be written. (The keys loaded up front fail the load
/// itself.)
pub(crate) fn check_reads(view: &ContextView) -> Result<(), Error> {
    match view.lazy().and_then(|lazy| lazy.error()) {
        Some(e) => Err(StoreError::Fetch(e.to_string()).into()),
        None => Ok(()),
    }
}

/// The run's keys every job loads, whatever its node: the header keys and the awaiting keys.
pub(crate) fn run_keys() -> impl Iterator<Item = &'static str> {
    HEADER_KEYS
        .into_iter()
        .chain([AWAITING_NODE_IDS, AWAITING_DETAILS])
}

/// The keys a job of `node_id` is expected to read — the run's header and awaiting keys,
/// the node's output and input (and its sources), the bookkeeping of it and its successors
/// where they repeat, a worker's batch record — loaded with the run's status in one query
/// shared with concurrent jobs. Any other key is fetched when read.
pub(crate) fn expected_reads(bp: Option<&Blueprint>, node_id: &str) -> Vec<String> {
    let mut keys: Vec<String> = run_keys().map(str::to_string).collect();
    keys.extend([output_key(node_id), input_key(node_id)]);
    let Some(bp) = bp else {
        return keys;
    };
    if let Some(gather) = batch::gather_of(node_id) {
        keys.extend([batch_key(gather), output_key(gather)]);
        if batch::worker_repeats(bp, node_id) {
            keys.extend([meta_key(node_id), meta_key(gather)]);
        }
    }
    let Some(index) = bp.node_index(node_id) else {
        return keys;
    };
    let def = bp.node(index);
    // Bookkeeping of a node that repeats: which of its iterations are committed.
    if bp.may_repeat(index) {
        keys.push(meta_key(node_id));
    }
    let sources: Vec<&str> = match &def.inputs {
        None => Vec::new(),
        Some(NodeInputs::Key(source)) => vec![source.as_str()],
        Some(NodeInputs::Map(sources)) => sources.values().map(String::as_str).collect(),
    };
    for source in sources {
        keys.push(source.to_string());
        if !source.starts_with('_') {
            let head = source.split('.').next().unwrap_or_default();
            keys.extend([output_key(head), head.to_string()]);
        }
    }
    if def.uses == crate::engine::flow::BATCH_GATHER {
        keys.push(batch_key(node_id));
    }
    // Successors that repeat (also through the nodes this one stands in for as a
    // fallback): their executions decide their iteration.
    let stood_in_for = bp.fallback_of(index).iter().copied();
    for from in std::iter::once(index).chain(stood_in_for) {
        for &edge in bp.outgoing(from) {
            let target = bp.edge_ends(edge).1;
            if bp.may_repeat(target) {
                keys.push(meta_key(&bp.node(target).id));
            }
        }
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}
