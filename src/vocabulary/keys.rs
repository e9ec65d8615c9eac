//! The keys of a run's context that the runtimes write, as Flowcraft names them.
//!
//! | key | holds |
//! | --- | --- |
//! | `_outputs.<node>` | the node's output |
//! | `_inputs.<node>` | the node's input, set by the edge that made it ready |
//! | `_node.<node>` | bookkeeping of a node that may repeat or chose its successors: its iteration, action, fallback and the successors it reported |
//! | `_batch.<gather>` | a batch in flight: its scatter, worker `uses`, params and worker ids |
//! | `_awaitingNodeIds` | the nodes a paused run awaits |
//! | `_awaitingDetails` | each awaited node's details (reason, wake-up time, webhook, child run) |
//! | `_parent` | a subflow child's link to its parent run and node |
//! | `_resume.action`, `_resume.output` | what the last resume brought |
//! | `_catch_error` | the error a fallback node runs for |
//! | `blueprintId`, `blueprintVersion` | the blueprint a run was started with |

/// Prefix of a node's output key.
pub const OUTPUTS_PREFIX: &str = "_outputs.";
/// Prefix of a node's input key.
pub const INPUTS_PREFIX: &str = "_inputs.";
/// Prefix of a node's bookkeeping key.
pub const NODE_META_PREFIX: &str = "_node.";
/// Prefix of a batch's key (followed by its gather node's id).
pub const BATCH_PREFIX: &str = "_batch.";
/// The nodes a paused run awaits.
pub const AWAITING_NODE_IDS: &str = "_awaitingNodeIds";
/// The details of each awaited node.
pub const AWAITING_DETAILS: &str = "_awaitingDetails";
/// A subflow child's link to its parent: `{runId, nodeId, blueprintId}`.
pub const PARENT_KEY: &str = "_parent";
/// The action a resume brought.
pub const RESUME_ACTION: &str = "_resume.action";
/// The output a resume brought.
pub const RESUME_OUTPUT: &str = "_resume.output";
/// The error a fallback node runs for: `{message, nodeId, blueprintId}`.
pub const CATCH_ERROR: &str = "_catch_error";
/// The id of the blueprint a run was started with.
pub const BLUEPRINT_ID: &str = "blueprintId";
/// The version of the blueprint a run was started with.
pub const BLUEPRINT_VERSION: &str = "blueprintVersion";

/// The context key holding a node's output.
pub fn output_key(node_id: &str) -> String {
    format!("{OUTPUTS_PREFIX}{node_id}")
}

/// The context key holding a node's input.
pub fn input_key(node_id: &str) -> String {
    format!("{INPUTS_PREFIX}{node_id}")
}

/// The context key holding a node's bookkeeping.
pub fn meta_key(node_id: &str) -> String {
    format!("{NODE_META_PREFIX}{node_id}")
}

/// The context key holding the batch gathered by `gather_id`.
pub fn batch_key(gather_id: &str) -> String {
    format!("{BATCH_PREFIX}{gather_id}")
}

/// Keys every job of a run reads (its blueprint, its version, its parent run): kept beside
/// the starting context in PostgreSQL, so reading them never decompresses it.
/// (The order is the `header` column's, see `migrations/0002_entries.sql`.)
pub const HEADER_KEYS: [&str; 3] = [BLUEPRINT_ID, BLUEPRINT_VERSION, PARENT_KEY];

/// Whether only a run itself writes `key` — node outputs, inputs and bookkeeping, batch
/// records, the awaiting keys — so that it is never part of the context a run starts with.
pub fn is_run_record(key: &str) -> bool {
    [
        OUTPUTS_PREFIX,
        INPUTS_PREFIX,
        NODE_META_PREFIX,
        BATCH_PREFIX,
    ]
    .iter()
    .any(|p| key.starts_with(p))
        || key == AWAITING_NODE_IDS
        || key == AWAITING_DETAILS
}
